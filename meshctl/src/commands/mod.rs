//! One module per noun, as docker's CLI is organized.

pub(crate) mod network;
pub(crate) mod node;
pub(crate) mod service;
pub(crate) mod swarm;
pub(crate) mod task;
