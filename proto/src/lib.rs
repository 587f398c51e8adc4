//! mesh's gRPC schema (tonic/prost, from `proto/*.proto`), the descriptor
//! set that managers serve for reflection, and the conversions between the
//! wire messages and the model ([`convert`]).

#![allow(clippy::doc_markdown, clippy::large_enum_variant)]

pub mod convert;

pub mod v1 {
    tonic::include_proto!("mesh.v1");
}

pub use convert::WireError;
pub use v1::*;

/// The encoded `FileDescriptorSet` of every mesh proto file, for gRPC
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mesh_descriptor");
