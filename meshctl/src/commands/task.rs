//! `meshctl task`: the low-level task commands.

use crate::*;

#[derive(Subcommand)]
pub(crate) enum TaskCmd {
    /// Record a task of SERVICE on NODE whose network namespace is NETNS.
    Create {
        #[arg(long)]
        service: String,
        #[arg(long)]
        node: String,
        #[arg(long, default_value_t = 1)]
        slot: u32,
        /// The task's namespace: /run/netns/NAME or /proc/PID/ns/net.
        #[arg(long)]
        netns: Option<String>,
    },
    Rm {
        #[arg(required = true)]
        tasks: Vec<String>,
    },
}

pub(crate) async fn task(c: &mut Client, cmd: TaskCmd) -> Res {
    let propose = async |c: &mut Client, cmd: Command| -> Res<Outcome> {
        let r: Result<Outcome, String> = from_blob(c.api.propose(blob(&cmd)).await.map_err(err)?)?;
        r
    };
    match cmd {
        TaskCmd::Create {
            service,
            node,
            slot,
            netns,
        } => {
            let out = propose(
                c,
                Command::CreateTask {
                    id: mtls::ids::new_id(),
                    service,
                    slot,
                    node,
                    netns,
                },
            )
            .await?;
            match out {
                Outcome::Task(t) => {
                    println!("{}", t.id);
                    for a in &t.attachments {
                        println!("{} {}", a.network, a.addr);
                    }
                    Ok(())
                }
                other => Err(format!("unexpected answer {other:?}")),
            }
        }
        TaskCmd::Rm { tasks } => {
            for id in tasks {
                propose(c, Command::RemoveTask { id: id.clone() }).await?;
                println!("{id}");
            }
            Ok(())
        }
    }
}
