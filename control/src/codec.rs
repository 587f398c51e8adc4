//! How manager-internal bodies are encoded: Raft RPCs, forwarded
//! proposals and the agents' session messages. One place, so that the
//! encoding changes in one step (see docs/architecture.md).

use serde::{Serialize, de::DeserializeOwned};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encoding: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("decoding: {0}")]
    Decode(#[source] serde_json::Error),
}

pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    serde_json::to_vec(v).map_err(CodecError::Encode)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    serde_json::from_slice(bytes).map_err(CodecError::Decode)
}
