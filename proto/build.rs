fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so a fresh machine needs no system package.
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    tonic_prost_build::configure().compile_protos(&["proto/mesh.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/mesh.proto");
    Ok(())
}
