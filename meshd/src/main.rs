//! meshd: the mesh node daemon. A thin binary: the command line
//! ([`cli`]), and the wiring of the control plane (`control`) with the
//! node (`node`) in [`serve`].

mod cli;
mod serve;

use std::fs;

use anyhow::{Context as _, Result, bail};
use clap::Parser as _;
use control::daemon::{self, InitOptions, Unlock};
use dataplane::{
    inspect::{LbTable, read_lb},
    stats::ParserStats,
};
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command, LbCommand, NodeArgs, Start};

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn down(node: &NodeArgs) -> Result<()> {
    for line in runtime()?.block_on(node::down(&node.node, &node.bpf_root))? {
        println!("meshd: {line}");
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Init {
            ctl,
            at,
            autolock,
            cert_lifetime,
            heartbeat_period,
            heartbeat_misses,
            network_key_rotation,
            ingress_subnet,
            dp,
        } => serve::serve(
            Start::Init {
                dir: ctl.data_dir,
                at: at.resolve()?,
                opts: InitOptions {
                    autolock,
                    cert_lifetime,
                    heartbeat: heartbeat_period,
                    heartbeat_misses,
                    network_key_rotation,
                    ingress_subnet,
                },
            },
            dp,
        ),
        Command::Join {
            ctl,
            at,
            token,
            manager,
            dp,
        } => serve::serve(
            Start::Join {
                dir: ctl.data_dir,
                at: at.resolve()?,
                token,
                manager,
            },
            dp,
        ),
        Command::Run {
            data_dir,
            unlock_key_file,
            dp,
        } => {
            let start = match data_dir {
                Some(dir) => {
                    Start::Run {
                        dir,
                        unlock: match unlock_key_file {
                            Some(f) => {
                                let text = fs::read_to_string(&f)
                                    .with_context(|| format!("reading {}", f.display()))?;
                                Unlock::Key(text.trim().parse().with_context(|| {
                                    format!("{}: not an unlock key", f.display())
                                })?)
                            }
                            None => Unlock::Wait,
                        },
                    }
                }
                None if dp.underlay.is_some() => Start::None,
                None => bail!(
                    "nothing to run: give --data-dir (the control plane of a node that ran init or join) and/or --node and --underlay (the data plane)"
                ),
            };
            serve::serve(start, dp)
        }
        Command::Unlock { ctl } => {
            let mut key = String::new();
            std::io::stdin()
                .read_line(&mut key)
                .context("reading the unlock key from stdin")?;
            runtime()?.block_on(daemon::send_unlock(&ctl.data_dir, &key))?;
            println!("meshd: unlocked");
            Ok(())
        }
        Command::Stats { node } => {
            let stats = ParserStats::read_pinned(&node.dir()?).with_context(|| {
                format!("is meshd running (or has it run) on node {}?", node.node)
            })?;
            print!("{stats}");
            Ok(())
        }
        Command::Lb {
            command: LbCommand::Ls { node },
        } => {
            let views = read_lb(&node.dir()?).with_context(|| {
                format!("is meshd running (or has it run) on node {}?", node.node)
            })?;
            print!("{}", LbTable(&views));
            Ok(())
        }
        Command::Down { node } => down(&node),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::Cli;

    /// `meshd init --cert-lifetime 999999999999999999d` once panicked on
    /// overflow; every duration flag now gives its range instead.
    #[test]
    fn duration_flags_refuse_overflow_with_the_range() {
        for (flag, value) in [
            ("--cert-lifetime", "999999999999999999d"),
            ("--cert-lifetime", "9999999d"),
            ("--cert-lifetime", "99999999999999999999999"),
            ("--network-key-rotation", "99999999999999999h"),
            ("--heartbeat-period", "99999999999999999999ms"),
        ] {
            let err = Cli::try_parse_from(["meshd", "init", flag, value])
                .err()
                .unwrap_or_else(|| panic!("{flag} {value} was accepted"));
            let text = err.to_string();
            assert!(
                text.contains("out of range") || text.contains("is not a duration"),
                "{flag} {value}: {text}"
            );
        }
        assert!(Cli::try_parse_from(["meshd", "init", "--cert-lifetime", "3650d"]).is_ok());
    }
}
