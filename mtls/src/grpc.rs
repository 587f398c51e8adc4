//! What every gRPC endpoint and client here shares: the message limit,
//! how a status reads to a person, and the words a manager uses to tell a
//! node it was removed.

use tonic::Status;

use crate::client as tls;

/// Largest gRPC message (Raft batches and snapshots).
pub const MAX_MESSAGE: usize = 64 << 20;

/// What a manager says to a node it removed (see [`Ctx::identify`]).
pub const REMOVED: &str = "has been removed from the cluster";

/// Whether `s` is a manager telling this node that it was removed.
pub fn is_removal(s: &Status) -> bool {
    s.code() == tonic::Code::PermissionDenied && s.message().contains(REMOVED)
}

/// A status as users should read it: the message, with the code only when
/// the message alone would not say what happened.
pub fn status_text(s: &tonic::Status) -> String {
    let msg = s.message();
    match std::error::Error::source(s) {
        Some(src) => {
            let mut chain = tls::chain(src);
            if chain.contains("NotValidForName") || chain.contains("not valid for name") {
                chain.push_str(
                    " (the node at that address is not a manager: its certificate does not name mesh-manager)",
                );
            }
            if chain.contains("UnknownIssuer") {
                chain.push_str(
                    " (the manager's certificate is not signed by the cluster CA this client \
                     trusts: another cluster at that address, or the wrong --ca)",
                );
            }
            if chain.contains("UnknownCA") || chain.contains("UnknownCa") {
                chain.push_str(
                    " (the manager does not trust this node's certificate: it was issued by \
                     another cluster's CA; this node must join this cluster with its token)",
                );
            }
            if chain.contains("CertificateExpired") || chain.contains("Expired") {
                chain.push_str(
                    " (a certificate in this connection has expired: see `openssl x509 -enddate` \
                     on the node's certs/node.crt; a node stopped past its certificate's lifetime \
                     must join again)",
                );
            }
            let detail = chain
                .strip_prefix("transport error")
                .map(|d| d.trim_start_matches(": "))
                .unwrap_or(&chain);
            match (msg, detail) {
                ("" | "transport error", "") => "transport error".into(),
                ("" | "transport error", d) => d.to_owned(),
                (m, "") => m.to_owned(),
                (m, d) => format!("{m}: {d}"),
            }
        }
        None if msg.is_empty() => format!("{:?}", s.code()),
        None => msg.to_owned(),
    }
}
