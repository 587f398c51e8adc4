//! Loading mesh's eBPF object and attaching its programs.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    programs::{ProgramError, Xdp, XdpMode},
};
use dataplane_common::{maps, programs};

/// The eBPF object built from `dataplane-ebpf` by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object (pin directory {pin_dir:?})")]
    Object {
        pin_dir: Option<PathBuf>,
        #[source]
        source: Box<EbpfError>,
    },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("program {program}: {operation}")]
    Program {
        program: &'static str,
        operation: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching {program} to interface {interface}")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: Box<ProgramError>,
    },
}

/// The loaded object: every program verified and loaded, none attached yet.
pub struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the object. With `pin_dir`, every map is pinned there by name, and
    /// maps already pinned there (by an earlier meshd) are reused, so counters
    /// and tables survive a daemon restart.
    pub fn load(pin_dir: Option<&Path>) -> Result<Self, LoadError> {
        raise_memlock();
        let pins: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => maps::ALL.iter().map(|m| (*m, dir.join(m))).collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(|source| LoadError::Object {
            pin_dir: pin_dir.map(Path::to_owned),
            source: Box::new(source),
        })?;
        let xdp = xdp_mut(&mut ebpf, programs::XDP_PARSE)?;
        xdp.load().map_err(|source| LoadError::Program {
            program: programs::XDP_PARSE,
            operation: "verifier/load",
            source: Box::new(source),
        })?;
        Ok(Datapath { ebpf })
    }

    /// Attaches the parser to `interface` (in the caller's network namespace).
    /// The attachment is a bpf_link owned by this value: dropping it detaches.
    pub fn attach_parser(&mut self, interface: &str, mode: XdpMode) -> Result<(), LoadError> {
        self.parser()?
            .attach(interface, mode)
            .map_err(|source| LoadError::Attach {
                program: programs::XDP_PARSE,
                interface: interface.to_owned(),
                source: Box::new(source),
            })?;
        Ok(())
    }

    /// The parser program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn parser(&mut self) -> Result<&mut Xdp, LoadError> {
        xdp_mut(&mut self.ebpf, programs::XDP_PARSE)
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }
}

fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, LoadError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?;
    program.try_into().map_err(|source| LoadError::Program {
        program: name,
        operation: "expected an XDP program",
        source: Box::new(source),
    })
}

/// Older kernels charge BPF memory to RLIMIT_MEMLOCK; 5.11+ charge the cgroup.
/// Raising the limit can fail (it does on this host), and that is fine there.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot raise RLIMIT_MEMLOCK; relying on cgroup accounting"
        );
    }
}
