//! Attaching a pinned tc program to an interface's TCX ingress with three plain `bpf(2)` calls
//! (get the pinned program, create the link, pin the link). The CNI plugin does this on every
//! ADD: going through aya costs ~10 ms of kernel feature probing per process, this costs
//! microseconds. The result is the same TCX link `datapath::attach_pinned_from_pod` makes.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result};

// From the kernel's uapi `linux/bpf.h`.
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_TCX_INGRESS: u32 = 46;

/// `union bpf_attr`, zeroed, large enough for the commands used here (the kernel requires
/// every byte it does not know to be zero).
type Attr = [u8; 128];

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<RawFd> {
    // SAFETY: `attr` is a valid, writable buffer of the size passed.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as RawFd)
}

fn put_u32(attr: &mut Attr, offset: usize, v: u32) {
    attr[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut Attr, offset: usize, v: u64) {
    attr[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", path.display()))
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Attaches the program pinned at `prog_pin` to the TCX ingress of `ifindex` (current netns)
/// and pins the new link at `link_pin`, which must not exist.
pub fn attach_pinned_ingress(prog_pin: &Path, ifindex: u32, link_pin: &Path) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let prog_path = c_path(prog_pin)?;
    let mut attr: Attr = [0; 128];
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; ... }
    put_u64(&mut attr, 0, prog_path.as_ptr() as u64);
    let prog = owned(
        bpf(BPF_OBJ_GET, &mut attr)
            .with_context(|| format!("opening the pinned program {}", prog_pin.display()))?,
    );
    let mut attr: Attr = [0; 128];
    // link_create: { prog_fd; target_ifindex; attach_type; flags; tcx {relative; revision} }
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, ifindex);
    put_u32(&mut attr, 8, BPF_TCX_INGRESS);
    let link = owned(
        bpf(BPF_LINK_CREATE, &mut attr)
            .with_context(|| format!("creating a TCX ingress link on ifindex {ifindex}"))?,
    );
    let link_path = c_path(link_pin)?;
    let mut attr: Attr = [0; 128];
    put_u64(&mut attr, 0, link_path.as_ptr() as u64);
    put_u32(&mut attr, 8, link.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr)
        .with_context(|| format!("pinning the link at {}", link_pin.display()))?;
    Ok(())
}
