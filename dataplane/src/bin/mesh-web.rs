//! `mesh-web`: the small HTTP server mesh's demo and tests run as a task.
//!
//! Every request is answered with one line naming who answered:
//! `<HOSTNAME> <task address>` (the task's name, as the executor sets
//! HOSTNAME, and the address the connection came in on). `GET /env/NAME`
//! answers that variable instead, and `GET /resolve/NAME` what the task's
//! resolver says NAME is (the embedded DNS, through /etc/resolv.conf).
//! `GET /slow/MS/...` waits MS milliseconds before answering.
//!
//! On SIGTERM it stops accepting and exits once its open connections are
//! done, as a well-behaved service does during a rolling update.

use std::{
    net::{SocketAddr, ToSocketAddrs as _},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use clap::Parser;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
};

#[derive(Parser)]
#[command(about = "A small HTTP server that names the task that answered")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:80")]
    listen: SocketAddr,
    /// Exit with this code after this many ms (a task that fails, for
    /// restart and rollback tests).
    #[arg(long, value_names = ["MS", "CODE"], num_args = 2)]
    exit_after: Option<Vec<u64>>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    let name = std::env::var("HOSTNAME").unwrap_or_else(|_| "mesh-web".into());
    println!("mesh-web: {name} listening on {}", args.listen);
    let open = Arc::new(AtomicUsize::new(0));
    let mut term = signal(SignalKind::terminate())?;
    let exit_after = args.exit_after.map(|v| (v[0], v[1] as i32));
    let deadline = async {
        match exit_after {
            Some((ms, code)) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                code
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((conn, _)) = accepted else { continue };
                let (name, open) = (name.clone(), open.clone());
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _ = serve(conn, &name).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
            _ = term.recv() => break,
            code = &mut deadline => {
                println!("mesh-web: exiting with {code} as told");
                std::process::exit(code);
            }
        }
    }
    drop(listener);
    println!(
        "mesh-web: SIGTERM; finishing {} open connection(s)",
        open.load(Ordering::SeqCst)
    );
    while open.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One HTTP/1.x exchange (the connection closes after it).
async fn serve(mut conn: TcpStream, name: &str) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // Up to the end of the headers (or a full buffer).
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf[len..]))
            .await
            .map_err(|_| std::io::Error::other("request timed out"))??;
        if n == 0 {
            break;
        }
        len += n;
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let path = request
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/");
    // A slow answer: a long-lived request (drain tests).
    if let Some(ms) = path
        .strip_prefix("/slow/")
        .and_then(|rest| rest.split('/').next())
        .and_then(|m| m.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let (status, body) = if let Some(var) = path.strip_prefix("/env/") {
        match std::env::var(var) {
            Ok(v) => ("200 OK", format!("{v}\n")),
            Err(_) => ("404 Not Found", format!("{var} is not set\n")),
        }
    } else if let Some(host) = path.strip_prefix("/resolve/") {
        let host = host.to_owned();
        let found = tokio::task::spawn_blocking(move || {
            (host.as_str(), 0)
                .to_socket_addrs()
                .map(|a| a.map(|s| s.ip().to_string()).collect::<Vec<_>>())
        })
        .await
        .map_err(std::io::Error::other)?;
        match found {
            Ok(addrs) => ("200 OK", format!("{}\n", addrs.join(" "))),
            Err(e) => ("404 Not Found", format!("{e}\n")),
        }
    } else {
        let local = conn.local_addr()?.ip();
        ("200 OK", format!("{name} {local}\n"))
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}
