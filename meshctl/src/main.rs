//! meshctl: the mesh CLI. Cluster commands (node, service, network) talk gRPC
//! to a manager and arrive with the control plane; until then this binary only
//! answers --help/--version. Local data-plane counters: `meshd stats --node N`.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "meshctl",
    version,
    about = "mesh command-line client",
    after_help = "No cluster commands exist yet. For this node's data-plane counters run `meshd stats --node NAME`."
)]
struct Cli {}

fn main() {
    Cli::parse();
    eprintln!("meshctl: no command given; see `meshctl --help`");
    std::process::exit(2);
}
