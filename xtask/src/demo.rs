//! `cargo xtask demo`: three hosts in network namespaces on one underlay
//! bridge, meshd on each, real traffic between them, and each host's
//! data-plane counters as meshd reports them.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use mesh_tests::{
    ChildGuard, Host, Topology,
    netns::{BPF_ROOT, UNDERLAY_IFACE, wait_for},
};

const HOSTS: usize = 3;
const TCP_BYTES: usize = 256 * 1024;
const HTTP_PORT: u16 = 8080;

pub fn run() -> Result<()> {
    if !crate::is_root() {
        bail!("the demo creates network namespaces and loads eBPF: run it as root");
    }
    crate::setup::run()?;
    crate::run_ok(crate::cargo().args(["build", "--package", "dataplane", "--bins"]))?;
    let meshd = crate::target_dir().join("debug/meshd");

    println!("\n== underlay: bridge br0 in its own namespace, {HOSTS} hosts attached by veth");
    let topo = Topology::new(HOSTS);
    for h in topo.hosts() {
        println!(
            "   {:<6} {}/{}  netns {}",
            h.label(),
            h.addr(),
            h.prefix_len(),
            h.ns().name()
        );
    }

    println!(
        "\n== starting meshd on every host (XDP parser on {UNDERLAY_IFACE}, maps pinned under {BPF_ROOT}/<node>)"
    );
    let _daemons: Vec<ChildGuard> = topo
        .hosts()
        .iter()
        .map(|h| start_meshd(h, &meshd))
        .collect::<Result<_>>()?;
    for h in topo.hosts() {
        println!(
            "   {:<6} XDP program id {}",
            h.label(),
            h.xdp_prog_id(UNDERLAY_IFACE).unwrap_or(0)
        );
    }

    println!("\n== traffic");
    let server = topo.host(0);
    let listener = server
        .enter(|| TcpListener::bind(SocketAddr::from((server.addr(), HTTP_PORT))))
        .context("bind the demo service")?;
    let serve = std::thread::spawn(move || serve(listener, HOSTS - 1));
    for client in &topo.hosts()[1..] {
        let reply = http_get(client, server)?;
        println!(
            "   {} -> {} GET /: {reply} ({TCP_BYTES} bytes)",
            client.label(),
            server.label()
        );
    }
    serve.join().expect("server thread")?;
    for (i, h) in topo.hosts().iter().enumerate() {
        let peer = topo.host((i + 1) % HOSTS);
        let out = h.exec_ok(
            "ping",
            &["-q", "-c", "5", "-i", "0.05", &peer.addr().to_string()],
        );
        let summary = out
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("")
            .trim();
        println!("   {} -> {} ping: {summary}", h.label(), peer.label());
    }

    println!("\n== counters per host (`meshd stats --node <netns>`)");
    for h in topo.hosts() {
        let out = Command::new(&meshd)
            .args(["stats", "--node", h.node_name(), "--bpf-root", BPF_ROOT])
            .stderr(Stdio::inherit())
            .output()
            .context("meshd stats")?;
        if !out.status.success() {
            bail!("meshd stats failed on {}", h.label());
        }
        println!("-- {} ({})", h.label(), h.addr());
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!("\n== tearing down (namespaces, pins and daemons are removed)");
    Ok(())
}

fn start_meshd(host: &Host, meshd: &std::path::Path) -> Result<ChildGuard> {
    let mut cmd = host.command(meshd);
    cmd.args([
        "run",
        "--node",
        host.node_name(),
        "--underlay",
        UNDERLAY_IFACE,
        "--bpf-root",
        BPF_ROOT,
    ])
    .env("RUST_LOG", "warn")
    .stdin(Stdio::null());
    let mut child = host.spawn(&mut cmd);
    wait_for(
        &format!("meshd on {}", host.label()),
        Duration::from_secs(20),
        || {
            child.assert_running();
            host.xdp_prog_id(UNDERLAY_IFACE).is_some()
        },
    );
    Ok(child)
}

/// A minimal HTTP/1.0 service: answers `clients` requests with TCP_BYTES of body.
fn serve(listener: TcpListener, clients: usize) -> Result<()> {
    for _ in 0..clients {
        let (mut conn, _) = listener.accept()?;
        let mut req = [0u8; 1024];
        let _ = conn.read(&mut req)?;
        let body = vec![b'm'; TCP_BYTES];
        write!(
            conn,
            "HTTP/1.0 200 OK\r\nContent-Length: {TCP_BYTES}\r\n\r\n"
        )?;
        conn.write_all(&body)?;
    }
    Ok(())
}

fn http_get(client: &Host, server: &Host) -> Result<String> {
    let addr = SocketAddr::from((server.addr(), HTTP_PORT));
    let mut conn = client.enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
    conn.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp)?;
    let head = String::from_utf8_lossy(&resp[..resp.len().min(64)]);
    let status = head.lines().next().unwrap_or("").to_owned();
    if resp.len() < TCP_BYTES {
        bail!(
            "short response from {}: {} bytes",
            server.label(),
            resp.len()
        );
    }
    Ok(status)
}
