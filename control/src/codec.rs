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
}
