//! The connection to a manager: connection flags, credentials from the
//! data dir or the command line, the gRPC client, JSON bodies, and how a
//! failed call reads.

use crate::*;

/// The help heading of the connection flags: shown after a command's own.
const CONNECTION: &str = "Connection options";

#[derive(Args)]
pub(crate) struct Conn {
    /// The local node's data dir: its credentials and manager addresses.
    #[arg(
        long,
        global = true, help_heading = CONNECTION,
        default_value = "/var/lib/mesh",
        env = "MESH_DATA_DIR"
    )]
    pub(crate) data_dir: PathBuf,
    /// A manager's API address (host:port); default: this node if it is a
    /// manager, else the managers it knows.
    #[arg(long, short = 'H', global = true, help_heading = CONNECTION, env = "MESH_HOST")]
    pub(crate) host: Option<String>,
    /// Client certificate (PEM), instead of the data dir's.
    #[arg(long, global = true, help_heading = CONNECTION, requires = "key")]
    pub(crate) cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, global = true, help_heading = CONNECTION, requires = "cert")]
    pub(crate) key: Option<PathBuf>,
    /// The cluster CA (PEM), instead of the data dir's.
    #[arg(long, global = true, help_heading = CONNECTION)]
    pub(crate) ca: Option<PathBuf>,
    /// Per-call timeout in seconds.
    #[arg(long, global = true, help_heading = CONNECTION, default_value_t = 15)]
    pub(crate) timeout: u64,
}

pub(crate) type Res<T = ()> = Result<T, String>;

/// A status as the user should see it: the server's words. A call whose
/// connection could not be made was not applied, and says so; a call cut
/// off otherwise (deadline, connection lost or reset) may have been
/// applied, and says that: never "not applied" for what may have been.
pub(crate) fn err(s: tonic::Status) -> String {
    let text = status_text(&s);
    if text.contains("(not applied") || text.starts_with("outcome unknown") {
        return text;
    }
    if model::api::never_sent(&text) {
        return format!("{text} (not applied: the manager could not be reached)");
    }
    match s.code() {
        tonic::Code::DeadlineExceeded
        | tonic::Code::Cancelled
        | tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Internal => format!(
            "{text}. If this was a change, its outcome is unknown: it may have been applied; \
             look (meshctl service ls, network ls or node ls) before retrying"
        ),
        _ => text,
    }
}

pub(crate) struct Client {
    pub(crate) api: ClusterClient<Channel>,
    pub(crate) addr: String,
}

pub(crate) fn read(path: &Path, what: &str) -> Res<String> {
    std::fs::read_to_string(path).map_err(|e| format!("reading the {what} {}: {e}", path.display()))
}

impl Conn {
    pub(crate) fn connect(&self) -> Res<Client> {
        let from_dir = Credentials::load(&certs_dir(&self.data_dir));
        let ca = match (&self.ca, &from_dir) {
            (Some(p), _) => read(p, "CA certificate")?,
            (None, Ok(c)) => c.ca.clone(),
            (None, Err(e)) => {
                return Err(format!(
                    "no cluster credentials: {e}. On a node, pass --data-dir; elsewhere --host, --ca, --cert and --key"
                ));
            }
        };
        let trust = match (&self.cert, &self.key, from_dir) {
            (Some(c), Some(k), _) => Trust::Node(Arc::new(RwLock::new(Credentials {
                ca,
                cert: read(c, "certificate")?,
                key: read(k, "key")?,
            }))),
            (_, _, Ok(mut creds)) => {
                creds.ca = ca;
                Trust::Node(Arc::new(RwLock::new(creds)))
            }
            _ => Trust::Anonymous(ca),
        };
        // A certificate the managers would refuse at the handshake is
        // named here, with why, instead of "connection closed" there.
        if let Trust::Node(creds) = &trust {
            let creds = creds.read().expect("creds lock");
            pki::identity(&creds.cert, &creds.ca, pki::now())
                .map_err(|e| format!("this client's {e}"))?;
        }
        let addr = match &self.host {
            Some(h) => h.clone(),
            None => self.local_manager()?,
        };
        let channel = tls::channel(&addr, trust, Duration::from_secs(self.timeout))
            .map_err(|e| e.to_string())?;
        Ok(Client {
            api: ClusterClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            addr,
        })
    }

    /// This node's API if it is a manager, else the first known manager.
    pub(crate) fn local_manager(&self) -> Res<String> {
        let file = NodeFile::load(&self.data_dir).map_err(|e| e.to_string())?;
        let creds = Credentials::load(&certs_dir(&self.data_dir)).map_err(|e| e.to_string())?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let role = pki::identity(&creds.cert, &creds.ca, now)
            .map(|i| i.role)
            .unwrap_or(Role::Worker);
        if role == Role::Manager {
            return Ok(file.api_addr);
        }
        file.managers
            .first()
            .cloned()
            .ok_or_else(|| "this node knows no manager; pass --host".to_owned())
    }
}

/// A reply as the model type; a reply the manager marked stale (it could
/// not confirm its state is current) is said so on stderr, with the
/// manager's reason.
pub(crate) fn from_reply<P, M>(r: tonic::Response<P>) -> Res<M>
where
    M: TryFrom<P, Error = proto::WireError>,
{
    if let Some(why) = r
        .metadata()
        .get(model::api::STALE_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        eprintln!("warning: this answer may be stale: {why}");
    }
    M::try_from(r.into_inner()).map_err(|e| format!("the manager answered an invalid reply: {e}"))
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}
