//! Shared code for mesh's eBPF programs. The programs themselves live in `main.rs`.
#![no_std]

pub mod lb;
pub mod parse;
pub mod reject;
