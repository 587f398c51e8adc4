// Rebuild the object when bpf-linker changes (e.g. rebuilt against another LLVM):
// cargo cannot see that dependency on its own.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
}
