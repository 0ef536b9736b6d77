//! `BPF_PROG_TEST_RUN` through aya's `TestRun`.
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};

/// Size of the kernel's `struct __sk_buff`, the context of tc programs.
const SK_BUFF_SIZE: usize = 192;
/// Offset of `ifindex` in `struct __sk_buff`.
const SK_BUFF_IFINDEX: usize = 40;
/// Offset of `gso_size` in `struct __sk_buff`.
const SK_BUFF_GSO_SIZE: usize = 176;

pub struct TestRunOutput {
    pub verdict: i32,
    pub data: Vec<u8>,
    pub duration_ns: u64,
}

/// Runs a tc program on `frame`; `ifindex` (when non-zero) is the device the packet arrives on
/// (it must exist in the calling thread's namespace).
pub fn run_tc(prog: &SchedClassifier, frame: &[u8], ifindex: u32, repeat: u32) -> TestRunOutput {
    run_tc_gso(prog, frame, ifindex, 0, repeat)
}

/// `run_tc` for a GSO packet: `gso_size` is the size of each segment's payload (as a pod's
/// TCP stack hands 64 KB super-packets to its veth).
pub fn run_tc_gso(
    prog: &SchedClassifier,
    frame: &[u8],
    ifindex: u32,
    gso_size: u32,
    repeat: u32,
) -> TestRunOutput {
    let mut ctx = [0u8; SK_BUFF_SIZE];
    ctx[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[SK_BUFF_GSO_SIZE..SK_BUFF_GSO_SIZE + 4].copy_from_slice(&gso_size.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    if ifindex > 1 || gso_size > 0 {
        opts.ctx_in = Some(&ctx);
    }
    opts.repeat = repeat;
    let result = prog.test_run(opts).unwrap_or_else(|e| {
        panic!(
            "BPF_PROG_TEST_RUN (tc) on a {}-byte frame: {e:?}",
            frame.len()
        )
    });
    out.truncate(result.data_size_out as usize);
    TestRunOutput {
        verdict: result.return_value as i32,
        data: out,
        duration_ns: result.duration.as_nanos() as u64,
    }
}

/// Runs an XDP program on `frame`.
pub fn run_xdp(prog: &Xdp, frame: &[u8], repeat: u32) -> TestRunOutput {
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    let result = prog.test_run(opts).unwrap_or_else(|e| {
        panic!(
            "BPF_PROG_TEST_RUN (xdp) on a {}-byte frame: {e:?}",
            frame.len()
        )
    });
    out.truncate(result.data_size_out as usize);
    TestRunOutput {
        verdict: result.return_value as i32,
        data: out,
        duration_ns: result.duration.as_nanos() as u64,
    }
}
