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
    match cmd {
        TaskCmd::Create {
            service,
            node,
            slot,
            netns,
        } => {
            let t: Task = from_reply(
                c.api
                    .create_task(CreateTaskRequest {
                        service,
                        node,
                        slot,
                        netns,
                    })
                    .await
                    .map_err(err)?,
            )?;
            println!("{}", t.id);
            for a in &t.attachments {
                println!("{} {}", a.network, a.addr);
            }
            Ok(())
        }
        TaskCmd::Rm { tasks } => {
            for id in tasks {
                c.api
                    .remove_task(Ref { target: id.clone() })
                    .await
                    .map_err(err)?;
                println!("{id}");
            }
            Ok(())
        }
    }
}
