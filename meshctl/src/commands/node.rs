//! `meshctl node`: ls, inspect, ps, update, promote/demote, rm.

use crate::*;

#[derive(Subcommand)]
pub(crate) enum NodeCmd {
    /// List nodes.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Only ids.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Show nodes in detail (JSON).
    Inspect {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make nodes managers.
    Promote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make managers workers.
    Demote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Remove nodes from the cluster.
    Rm {
        /// Remove a node that is still up.
        #[arg(long, short)]
        force: bool,
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Change a node's availability or labels.
    Update {
        #[arg(long, value_enum)]
        availability: Option<AvailabilityArg>,
        /// Add or change a label (key=value).
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        /// Remove a label.
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
        node: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum AvailabilityArg {
    Active,
    Pause,
    Drain,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum RoleArg {
    Worker,
    Manager,
}

pub(crate) async fn node(c: &mut Client, cmd: NodeCmd) -> Res {
    match cmd {
        NodeCmd::Ls { format, quiet } => {
            let mut nodes: Vec<NodeView> =
                from_reply(c.api.list_nodes(Empty {}).await.map_err(err)?)?;
            nodes.sort_by(|a, b| {
                a.node
                    .hostname
                    .cmp(&b.node.hostname)
                    .then(a.node.id.cmp(&b.node.id))
            });
            if quiet {
                nodes.iter().for_each(|n| println!("{}", n.node.id));
            } else if format == Format::Json {
                print_json(&nodes);
            } else {
                let mut t =
                    Table::new(&["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS"]);
                for n in &nodes {
                    t.row(vec![
                        if n.is_self {
                            format!("{} *", n.node.id)
                        } else {
                            n.node.id.clone()
                        },
                        n.node.hostname.clone(),
                        title(n.node.status),
                        title(n.node.spec.availability),
                        match n.manager_status {
                            Some(ManagerStatus::Leader) => "Leader".into(),
                            Some(ManagerStatus::Reachable) => "Reachable".into(),
                            Some(ManagerStatus::Unreachable) => "Unreachable".into(),
                            Some(ManagerStatus::Behind { entries }) => {
                                format!("Behind ({entries} entries)")
                            }
                            None => String::new(),
                        },
                    ]);
                }
                print!("{t}");
            }
            Ok(())
        }
        NodeCmd::Inspect { nodes } => {
            let mut out = Vec::new();
            for target in nodes {
                let v: NodeView =
                    from_reply(c.api.inspect_node(Ref { target }).await.map_err(err)?)?;
                out.push(v);
            }
            print_json(&out);
            Ok(())
        }
        NodeCmd::Promote { nodes } => set_role(c, nodes, Role::Manager).await,
        NodeCmd::Demote { nodes } => set_role(c, nodes, Role::Worker).await,
        NodeCmd::Rm { force, nodes } => {
            for target in nodes {
                c.api
                    .remove_node(Remove {
                        target: target.clone(),
                        force,
                    })
                    .await
                    .map_err(err)?;
                println!("{target}");
            }
            Ok(())
        }
        NodeCmd::Update {
            availability,
            label_add,
            label_rm,
            node,
        } => {
            let view: NodeView = from_reply(
                c.api
                    .inspect_node(Ref {
                        target: node.clone(),
                    })
                    .await
                    .map_err(err)?,
            )?;
            let mut spec: NodeSpec = view.node.spec.clone();
            if let Some(a) = availability {
                spec.availability = match a {
                    AvailabilityArg::Active => Availability::Active,
                    AvailabilityArg::Pause => Availability::Pause,
                    AvailabilityArg::Drain => Availability::Drain,
                };
            }
            for l in label_add {
                let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
                spec.labels.insert(k.to_owned(), v.to_owned());
            }
            for k in label_rm {
                if spec.labels.remove(&k).is_none() {
                    return Err(format!("node {node} has no label {k:?}"));
                }
            }
            c.api
                .update_node(UpdateNodeRequest {
                    target: view.node.id.clone(),
                    version: view.node.version,
                    spec: Some(spec.into()),
                })
                .await
                .map_err(err)?;
            println!("{node}");
            Ok(())
        }
    }
}

pub(crate) async fn set_role(c: &mut Client, nodes: Vec<String>, role: Role) -> Res {
    for target in nodes {
        let before: NodeView = from_reply(
            c.api
                .inspect_node(Ref {
                    target: target.clone(),
                })
                .await
                .map_err(err)?,
        )?;
        let word = match role {
            Role::Manager => "manager",
            Role::Worker => "worker",
        };
        if before.node.spec.role == role {
            println!("Node {target} is already a {word} in the swarm.");
            continue;
        }
        let _: Node = from_reply(
            c.api
                .set_role(SetRoleRequest {
                    target: target.clone(),
                    role: proto::Role::from(role).into(),
                })
                .await
                .map_err(err)?,
        )?;
        match role {
            Role::Manager => println!("Node {target} promoted to a manager in the swarm."),
            Role::Worker => println!("Manager {target} demoted in the swarm."),
        }
    }
    Ok(())
}
