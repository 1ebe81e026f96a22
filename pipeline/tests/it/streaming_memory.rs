//! A 1 GiB section goes through the reader with memory far below 1 GiB: the reader streams
//! (hash + decompress + write) instead of buffering. Checked with a counting allocator.

use crate::common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use shardrop::format::envelope::{
    Compression, EnvelopeBuilder, Expect, Kind, Limits, RemoteEnvelope, read_sections,
};
use shardrop::identity::Identity;
use shardrop::store::put_create;

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counters only
// observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout (the contract of `dealloc`).
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    // The system's own zeroed allocation and in-place growth, counted: this allocator serves
    // every test of the binary, which must not pay a copy per `Vec` growth for it.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on as it is.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator (hence `System`) with `layout`, and the
        // caller's contract for `realloc` (non-zero `new_size`, no overflow) is passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Counts what the reader delivers and checks it against the source pattern.
struct Check {
    seen: u64,
    hasher: blake3::Hasher,
}

impl Write for Check {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.seen += buf.len() as u64;
        self.hasher.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_section_streams_in_bounded_memory() {
    // The counting allocator sees every thread of the process: measured alone, in a child
    // process running only this test, so the other tests of this binary do not count.
    const ALONE: &str = "SHARDROP_TEST_MEMORY_ALONE";
    if std::env::var_os(ALONE).is_none() {
        let name = "one_gib_section_streams_in_bounded_memory";
        let passed =
            common::run_alone(module_path!(), name, [(ALONE.to_string(), "1".to_string())]).await;
        assert!(
            passed,
            "{name}: the measurement in the child process failed"
        );
        return;
    }
    const SIZE: u64 = 1 << 30;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("update.bin");
    let mut expected = blake3::Hasher::new();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
        let block = common::noise(1 << 20, 77);
        // Half-entropy data: compresses about 2x, so both hashing and decoding do real work.
        let block: Vec<u8> = block.iter().map(|b| b & 0x0f).collect();
        for _ in 0..(SIZE >> 20) {
            f.write_all(&block).unwrap();
            expected.update(&block);
        }
    }
    let id = Identity::from_seed([5; 32]);
    let signed = EnvelopeBuilder::new(Kind::Grad, "mem")
        .window(1)
        .level(1)
        .section_file("update.bin", &input, Compression::Zstd, Some(dir.path()))
        .unwrap()
        .sign(&id)
        .unwrap();
    std::fs::remove_file(&input).unwrap();
    let (target, label) = match common::s3("memory-bound") {
        Some(t) => (t, "s3"),
        None => (common::local(&dir.path().join("store")), "local"),
    };
    let path = target.path("big.grad");
    put_create(&target, &path, &signed).await.unwrap();
    drop(signed);

    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let limits = Limits::default();
    let env = RemoteEnvelope::open(
        target.store.as_ref(),
        &path,
        "big.grad",
        &limits,
        &Expect::default(),
    )
    .await
    .unwrap();
    let mut out = read_sections(
        target.store.as_ref(),
        &env,
        &[0],
        &limits,
        |_| {
            Ok(Check {
                seen: 0,
                hasher: blake3::Hasher::new(),
            })
        },
        &|_| {},
    )
    .await
    .unwrap();
    let check = out.pop().unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    assert_eq!(check.seen, SIZE);
    assert_eq!(
        check.hasher.finalize(),
        expected.finalize(),
        "delivered bytes are the original"
    );
    eprintln!(
        "{label}: peak heap while reading a 1 GiB section: {:.1} MiB",
        peak as f64 / (1 << 20) as f64
    );
    assert!(
        peak < 64 << 20,
        "reader used {peak} bytes of heap for a 1 GiB section"
    );
}
