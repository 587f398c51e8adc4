//! gRPC definitions (tonic/prost) shared by control, dataplane and meshctl.
//! The schema is `proto/mesh.proto`.

#![allow(clippy::doc_markdown, clippy::large_enum_variant)]

pub mod v1 {
    tonic::include_proto!("mesh.v1");
}

pub use v1::*;
