//! `meshctl swarm` and `info`: join tokens, the unlock key, the key ring.

use crate::*;

#[derive(Subcommand)]
pub(crate) enum SwarmCmd {
    /// Show (or rotate) the join token for a role.
    JoinToken {
        #[arg(value_enum)]
        role: RoleArg,
        /// Replace the token; the old one is refused from now on.
        #[arg(long)]
        rotate: bool,
        /// Only the token.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Show the key that unlocks an autolocked manager.
    UnlockKey {
        #[arg(long, short)]
        quiet: bool,
    },
    /// Add a new key to the encrypted networks' ring now (the leader does
    /// it every rotation period, 12 h by default); nodes move to it with no
    /// packet lost.
    RotateNetworkKey,
}

pub(crate) async fn swarm(c: &mut Client, cmd: SwarmCmd) -> Res {
    match cmd {
        SwarmCmd::JoinToken {
            role,
            rotate,
            quiet,
        } => {
            let (word, role) = match role {
                RoleArg::Worker => ("worker", Role::Worker),
                RoleArg::Manager => ("manager", Role::Manager),
            };
            let token = c
                .api
                .join_token(JoinTokenRequest {
                    role: proto::Role::from(role).into(),
                    rotate,
                })
                .await
                .map_err(err)?
                .into_inner()
                .token;
            if quiet {
                println!("{token}");
            } else {
                if rotate {
                    println!("Successfully rotated {word} join token.\n");
                }
                println!("To add a {word} to this swarm, run the following command:\n");
                println!("    meshd join --token {token} {}\n", c.addr);
            }
            Ok(())
        }
        SwarmCmd::UnlockKey { quiet } => {
            let key = c
                .api
                .unlock_key(Empty {})
                .await
                .map_err(err)?
                .into_inner()
                .key;
            if quiet {
                println!("{key}");
            } else {
                println!(
                    "To unlock a swarm manager after it restarts, run `meshd unlock` and provide the following key:\n"
                );
                println!("    {key}\n");
                println!(
                    "Please remember to store this key in a password manager, since without it you will not be able to restart the manager."
                );
            }
            Ok(())
        }
        SwarmCmd::RotateNetworkKey => {
            let ring: model::api::KeyRing =
                from_reply(c.api.rotate_network_key(Empty {}).await.map_err(err)?)?;
            let ids: Vec<String> = ring.keys.iter().map(|(id, _)| id.to_string()).collect();
            println!(
                "Network key ring rotated: keys {} (nodes send with key {})",
                ids.join(", "),
                ring.primary.map_or("-".to_owned(), |p| p.to_string())
            );
            Ok(())
        }
    }
}
