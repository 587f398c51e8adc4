//! How manager-internal bodies are encoded: Raft RPCs, forwarded
//! proposals, the agents' session messages, and (through the store) the
//! Raft log and its snapshots. postcard: compact, serde-derived, not
//! self-describing, so every type it carries is externally tagged and
//! writes every field (see docs/architecture.md, "Encodings").
//!
//! What users see (the API) is protobuf; what people read (`--format
//! json`, the node file) is JSON. This is neither: it is the managers'
//! and agents' own, and changes only with the store's format version.

use serde::{Serialize, de::DeserializeOwned};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encoding: {0}")]
    Encode(#[source] postcard::Error),
    #[error("decoding: {0}")]
    Decode(#[source] postcard::Error),
}

pub fn encode<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_stdvec(v).map_err(CodecError::Encode)
}

/// Decodes a whole body: bytes left over are an error, not ignored.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (v, rest) = postcard::take_from_bytes(bytes).map_err(CodecError::Decode)?;
    if !rest.is_empty() {
        return Err(CodecError::Decode(postcard::Error::DeserializeBadEncoding));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{Command, session::DispatcherMessage};

    #[test]
    fn trailing_bytes_and_truncation_are_refused() {
        let body = encode(&DispatcherMessage::Heartbeat).unwrap();
        let mut long = body.clone();
        long.push(0);
        assert!(decode::<DispatcherMessage>(&long).is_err());
        let cmd = Command::RemoveService {
            target: "abcdef".into(),
        };
        let body = encode(&cmd).unwrap();
        assert_eq!(decode::<Command>(&body).unwrap(), cmd);
        for cut in 0..body.len() {
            assert!(decode::<Command>(&body[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// The encoding's point: 1,000 endpoints (ids as the cluster makes
    /// them) in less than half their JSON, and back unchanged.
    #[test]
    fn a_table_of_endpoints_is_less_than_half_its_json() {
        use model::tables::{EndpointEntry, Key, Tables, Value};
        use std::net::Ipv4Addr;
        let mut t = Tables {
            revision: 12_345,
            ..Tables::default()
        };
        for i in 0..1000u32 {
            let [_, _, a, b] = i.to_be_bytes();
            let addr = Ipv4Addr::new(10, 0, a, b);
            t.entries.insert(
                Key::Endpoint {
                    network: "q3mtx2m0rlbq8pchbq2jcqrhw".into(),
                    task: format!("{i:0>25}"),
                },
                Value::Endpoint(EndpointEntry {
                    service: "k1vpl7n3d9xw2q4m6s8t0y5zc".into(),
                    task_name: format!("web.{i}"),
                    node: format!("node{:0>21}", i % 7),
                    node_addr: Ipv4Addr::new(198, 18, 0, (i % 7) as u8 + 1),
                    addr,
                    mac: model::tables::mac_of(addr),
                    netns: Some(format!("/run/netns/mesh-{i:0>25}")),
                    draining: i % 10 == 0,
                }),
            );
        }
        let binary = encode(&t).unwrap();
        let json = serde_json::to_vec(&t).unwrap();
        assert_eq!(decode::<Tables>(&binary).unwrap(), t);
        eprintln!(
            "1000 endpoints: {} bytes postcard, {} bytes JSON",
            binary.len(),
            json.len()
        );
        assert!(
            binary.len() * 2 < json.len(),
            "{} vs {}",
            binary.len(),
            json.len()
        );
    }
}
