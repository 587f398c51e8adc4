//! `meshctl network`: create, ls, inspect, rm.

use crate::*;

#[derive(Subcommand)]
pub(crate) enum NetworkCmd {
    /// Create an overlay network.
    Create {
        /// Only "overlay" exists.
        #[arg(long, short, default_value = "overlay")]
        driver: String,
        /// Subnet in CIDR form; default: the next free one from the pool.
        #[arg(long)]
        subnet: Option<String>,
        /// Driver options; "encrypted" asks for IPsec between nodes.
        #[arg(long = "opt", short = 'o')]
        opts: Vec<String>,
        /// No route out of the network.
        #[arg(long)]
        internal: bool,
        #[arg(long)]
        attachable: bool,
        name: String,
    },
    /// List networks.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Show networks in detail (JSON).
    Inspect {
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove networks (refused while a service uses them).
    Rm {
        #[arg(required = true)]
        networks: Vec<String>,
    },
}

pub(crate) async fn network(c: &mut Client, cmd: NetworkCmd) -> Res {
    match cmd {
        NetworkCmd::Create {
            driver,
            subnet,
            opts,
            internal,
            attachable,
            name,
        } => {
            if driver != "overlay" {
                return Err(format!(
                    "driver {driver:?} is not supported: mesh networks are overlay networks"
                ));
            }
            let mut spec = NetworkSpec {
                name,
                subnet: subnet
                    .map(|s| s.parse().map_err(|e| format!("--subnet {s}: {e}")))
                    .transpose()?,
                internal,
                attachable,
                ..NetworkSpec::default()
            };
            for o in opts {
                match o.as_str() {
                    "encrypted" | "encrypted=true" | "encrypted=" => spec.encrypted = true,
                    other => {
                        return Err(format!(
                            "unknown network option {other:?} (known: encrypted)"
                        ));
                    }
                }
            }
            let n: Network = from_reply(
                c.api
                    .create_network(proto::NetworkSpec::from(spec))
                    .await
                    .map_err(err)?,
            )?;
            println!("{}", n.id);
            Ok(())
        }
        NetworkCmd::Ls { format, quiet } => {
            let mut nets: Vec<Network> =
                from_reply(c.api.list_networks(Empty {}).await.map_err(err)?)?;
            nets.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
            if quiet {
                nets.iter().for_each(|n| println!("{}", short(&n.id)));
            } else if format == Format::Json {
                print_json(&nets);
            } else {
                let mut t = Table::new(&["NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNET", "VNI"]);
                for n in &nets {
                    t.row(vec![
                        short(&n.id).into(),
                        n.spec.name.clone(),
                        "overlay".into(),
                        "swarm".into(),
                        n.subnet.to_string(),
                        n.vni.to_string(),
                    ]);
                }
                print!("{t}");
            }
            Ok(())
        }
        NetworkCmd::Inspect { networks } => {
            let mut out = Vec::new();
            for target in networks {
                let n: Network =
                    from_reply(c.api.inspect_network(Ref { target }).await.map_err(err)?)?;
                out.push(n);
            }
            print_json(&out);
            Ok(())
        }
        NetworkCmd::Rm { networks } => {
            for target in networks {
                c.api
                    .remove_network(Remove {
                        target: target.clone(),
                        force: false,
                    })
                    .await
                    .map_err(err)?;
                println!("{target}");
            }
            Ok(())
        }
    }
}
