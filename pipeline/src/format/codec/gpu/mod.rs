//! The codec on an NVIDIA GPU (cargo feature `cuda`): encode from device buffers and copy
//! back only the sparse bytes; decode and accumulate into a device buffer.
//!
//! Why: a miner's update lives on the GPU; copying it to the host to compress costs PCIe
//! time and host memory per window. Here the error-feedback buffer stays on the device, the
//! kernels (`kernels.cu`, compiled at run time by NVRTC for the device at hand) do the
//! whole codec, and only index/value blocks and scales (1–3 % of the update) come back.
//!
//! The CPU codec is the reference: the kernels reproduce its body bytes and its updated
//! error-feedback buffer bit for bit (every float operation is an explicit
//! round-to-nearest intrinsic, compiled with `--fmad=false --ftz=false`). The tests run the
//! same kernel source on the CPU through a thread emulator everywhere, and on a GPU when one
//! is present.
//!
//! cudarc loads libcuda and libnvrtc at run time, so this builds and runs without a CUDA
//! toolkit; `Gpu::open` says why no GPU is usable instead of panicking, and callers fall
//! back to the CPU codec.

use std::ffi::CString;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::result::{self as nvrtc_result, NvrtcError};
use cudarc::nvrtc::{Ptx, sys as nvrtc_sys};

use super::cpu::check_accumulate;
use super::{
    ChunkLayout, CodecError, CodecParams, EfState, EncodeOptions, EncodedTensor, EncodedUpdate,
    InDtype, IndexEncoding, ScaleMode, ValueFormat, encode_update_with, validate,
};

/// The kernel source, compiled by NVRTC when a `Gpu` opens.
pub(crate) const KERNELS: &str = include_str!("kernels.cu");

/// Threads per block of the selection kernel (one block per chunk).
const SELECT_THREADS: u32 = 256;
/// Threads per block of the kernels that touch only the kept elements.
const SPARSE_THREADS: u32 = 128;
/// Chunks up to this size keep their magnitudes in shared memory during selection.
const SHARED_CHUNK: u32 = 8192;
/// A chunk's index and value blocks up to this size are assembled in shared memory.
const EMIT_SHARED_BYTES: usize = 32 << 10;
const NO_FAULT: u32 = u32::MAX;

/// Why the GPU path is not available or failed.
// Each variant is its message (`#[error]`).
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver (libcuda.so) on this machine")]
    NoDriver,
    #[error(
        "no NVRTC library (libnvrtc.so) to compile the codec kernels: install the CUDA \
         toolkit, or `pip install nvidia-cuda-nvrtc-cu12` and put its lib/ on LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    #[error("no CUDA device {ordinal} ({count} present)")]
    NoDevice { ordinal: usize, count: i32 },
    #[error("CUDA: {0}")]
    Driver(String),
    #[error("compiling the codec kernels: {0}")]
    Compile(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl crate::error::Classified for GpuError {
    /// A codec verdict keeps its class and code; a device that is missing or failed is a
    /// failure of this machine, not of any input.
    fn class(&self) -> crate::error::ErrorClass {
        match self {
            GpuError::Codec(e) => e.class(),
            _ => crate::error::ErrorClass::Internal,
        }
    }

    fn reason(&self) -> Option<&'static str> {
        match self {
            GpuError::Codec(e) => Some(e.reason()),
            _ => None,
        }
    }
}

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        GpuError::Driver(e.to_string())
    }
}

/// One tensor of an update, resident on the device: raw little-endian elements (f32, bf16
/// or f16 as `dtype` says). A `CudaSlice<f32>` or `<u16>` becomes one with
/// `transmute::<u8>(bytes)`.
pub struct DeviceTensor<'a> {
    /// The tensor's name in the model.
    pub name: &'a str,
    /// Its shape.
    pub shape: &'a [u64],
    /// The dtype of `data`.
    pub dtype: InDtype,
    /// The update's elements on the device, little-endian, row-major.
    pub data: CudaView<'a, u8>,
}

struct Kernels {
    ef_select: CudaFunction,
    emit: CudaFunction,
    decode: CudaFunction,
    scatter_add: CudaFunction,
    fill_bench: CudaFunction,
}

/// An opened GPU with the codec kernels loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    k: Kernels,
    name: String,
    arch: String,
}

fn launch_cfg(grid: usize, threads: u32, shared: u32) -> Result<LaunchConfig, GpuError> {
    let grid = u32::try_from(grid).map_err(|_| GpuError::Driver(format!("{grid} blocks")))?;
    Ok(LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared,
    })
}

fn dtype_code(d: InDtype) -> i32 {
    match d {
        InDtype::F32 => 0,
        InDtype::Bf16 => 1,
        InDtype::F16 => 2,
    }
}

/// Little-endian bytes of 32-bit staging words.
fn word_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Body blocks back to back from per-chunk staging of `stride` bytes.
fn compact_blocks(
    staged: &[u8],
    stride: usize,
    lay: &ChunkLayout,
    full: usize,
    last: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity((lay.n_chunks - 1) * full + last);
    for c in 0..lay.n_chunks {
        let len = if c + 1 == lay.n_chunks { last } else { full };
        out.extend_from_slice(&staged[c * stride..c * stride + len]);
    }
    out
}

impl Gpu {
    /// Opens device `ordinal` and compiles the kernels for it. Checks for the driver and
    /// NVRTC libraries first: cudarc panics when they are missing.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        // SAFETY: only probes whether the shared libraries can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(GpuError::NoNvrtc);
        }
        let count = CudaContext::device_count()?;
        if ordinal as i64 >= count as i64 {
            return Err(GpuError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let name = ctx.name()?;
        let (module, arch) = load_kernels(&ctx, major, minor)?;
        let f = |n: &str| module.load_function(n);
        let k = Kernels {
            ef_select: f("ef_select")?,
            emit: f("emit")?,
            decode: f("decode")?,
            scatter_add: f("scatter_add")?,
            fill_bench: f("fill_bench")?,
        };
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            k,
            name,
            arch,
        })
    }

    /// The device's name and the architecture the kernels were compiled for.
    pub fn describe(&self) -> String {
        format!("{} ({}, cuda:{})", self.name, self.arch, self.ctx.ordinal())
    }

    /// The stream every call here is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Encodes one device-resident tensor and advances its device-resident error-feedback
    /// buffer `state` (f32, the tensor's length). Returns the same `EncodedTensor` as
    /// `codec::encode_tensor` on the same data; only the sparse blocks are copied back.
    /// On error `state` is left part-updated, as on the CPU.
    pub fn encode_tensor(
        &self,
        input: &DeviceTensor,
        state: &mut CudaSlice<f32>,
        beta: f32,
        p: &CodecParams,
    ) -> Result<EncodedTensor, GpuError> {
        p.validate()?;
        let n: u64 = input.shape.iter().product();
        let size = input.dtype.size() as u64;
        if state.len() as u64 != n || input.data.len() as u64 != n * size {
            return Err(CodecError::SizeMismatch {
                tensor: input.name.into(),
                what: "update or state".into(),
                got: input.data.len(),
                want: (n * size) as usize,
            }
            .into());
        }
        let lay = ChunkLayout::new(n, p);
        let mut out = EncodedTensor {
            name: input.name.to_string(),
            shape: input.shape.to_vec(),
            dtype: input.dtype,
            params: *p,
            idx: Vec::new(),
            val: Vec::new(),
            scales: Vec::new(),
        };
        if lay.n_chunks == 0 {
            return Ok(out);
        }
        let s = &self.stream;
        let k = p.k;
        let chunks = lay.n_chunks;
        let mut sel = s.alloc_zeros::<u32>(chunks * k as usize)?;
        let mut maxes = s.alloc_zeros::<u32>(chunks)?;
        let mut tmax = s.alloc_zeros::<u32>(1)?;
        let mut fault = s.clone_htod(&[NO_FAULT, NO_FAULT])?;
        let use_shared = i32::from(p.chunk <= SHARED_CHUNK);
        // Magnitudes with one pad word per 32 (see `pad_slot` in kernels.cu).
        let shared = if use_shared == 1 {
            (p.chunk + p.chunk / 32) * 4
        } else {
            0
        };
        let (dt, chunk) = (dtype_code(input.dtype), p.chunk);
        let mut b = s.launch_builder(&self.k.ef_select);
        b.arg(&input.data)
            .arg(&dt)
            .arg(&mut *state)
            .arg(&n)
            .arg(&chunk)
            .arg(&k)
            .arg(&beta)
            .arg(&mut sel)
            .arg(&mut maxes)
            .arg(&mut tmax)
            .arg(&mut fault)
            .arg(&use_shared);
        // SAFETY: argument types and order match `ef_select` in kernels.cu; every buffer has
        // the length the kernel indexes (n, chunks*k, chunks, 1, 2).
        unsafe { b.launch(launch_cfg(chunks, SELECT_THREADS, shared)?) }?;

        let idx_stride = lay.idx_full.max(lay.idx_last).div_ceil(4);
        let val_stride = lay.val_full.div_ceil(4);
        let mut idx_w = s.alloc_zeros::<u32>(chunks * idx_stride)?;
        let mut val_w = s.alloc_zeros::<u32>(chunks * val_stride)?;
        let mut scales = s.alloc_zeros::<u16>(lay.n_scales.max(1))?;
        let vbits = p.values.bits();
        let tensor_scale = i32::from(p.scales == ScaleMode::Tensor);
        let compact = i32::from(p.indices == IndexEncoding::Compact);
        let (is, vs) = (idx_stride as u32, val_stride as u32);
        // A chunk's blocks are assembled in shared memory when they fit (see `emit`).
        let block_bytes = (idx_stride + val_stride) * 4;
        let emit_shared = i32::from(block_bytes <= EMIT_SHARED_BYTES);
        let mut b = s.launch_builder(&self.k.emit);
        b.arg(&mut *state)
            .arg(&n)
            .arg(&chunk)
            .arg(&k)
            .arg(&sel)
            .arg(&maxes)
            .arg(&tmax)
            .arg(&vbits)
            .arg(&tensor_scale)
            .arg(&compact)
            .arg(&mut idx_w)
            .arg(&is)
            .arg(&mut val_w)
            .arg(&vs)
            .arg(&mut scales)
            .arg(&mut fault)
            .arg(&emit_shared);
        let shared = if emit_shared == 1 {
            block_bytes as u32
        } else {
            0
        };
        // SAFETY: matches `emit`; staging holds chunks*stride zeroed words, every field
        // written lies inside its chunk's block (sizes from `ChunkLayout`), and the shared
        // memory holds both blocks when used.
        unsafe { b.launch(launch_cfg(chunks, SPARSE_THREADS, shared)?) }?;

        let fault = s.clone_dtoh(&fault)?;
        if fault[0] != NO_FAULT {
            return Err(CodecError::NonFinite {
                tensor: input.name.into(),
                what: "the update (or error-feedback buffer)".into(),
            }
            .into());
        }
        if fault[1] != NO_FAULT {
            return Err(CodecError::NonFinite {
                tensor: input.name.into(),
                what: "a value rounded to bf16".into(),
            }
            .into());
        }
        let idx = word_bytes(&s.clone_dtoh(&idx_w)?);
        let val = word_bytes(&s.clone_dtoh(&val_w)?);
        out.idx = compact_blocks(&idx, idx_stride * 4, &lay, lay.idx_full, lay.idx_last);
        out.val = compact_blocks(&val, val_stride * 4, &lay, lay.val_full, lay.val_last);
        if p.values != ValueFormat::Bf16 {
            let mut sc = s.clone_dtoh(&scales)?;
            sc.truncate(lay.n_scales);
            out.scales = sc;
        }
        Ok(out)
    }

    /// Adds `weight × decoded` into the device buffer `dense` (f32, the tensor's length).
    /// Every index and value is checked on the device before any is added: a bad tensor
    /// leaves `dense` untouched, and the error is the CPU codec's for the same bytes.
    pub fn accumulate(
        &self,
        t: &EncodedTensor,
        dense: &mut CudaSlice<f32>,
        weight: f32,
    ) -> Result<(), GpuError> {
        let lay = check_accumulate(t, dense.len())?;
        if lay.n_chunks == 0 {
            return Ok(());
        }
        let s = &self.stream;
        let p = t.params;
        let chunks = lay.n_chunks;
        let idx = s.clone_htod(&t.idx)?;
        let val = s.clone_htod(&t.val)?;
        let scales = if t.scales.is_empty() {
            s.clone_htod(&[0u16])?
        } else {
            s.clone_htod(&t.scales)?
        };
        let mut sp_idx = s.alloc_zeros::<u32>(chunks * p.k as usize)?;
        let mut sp_val = s.alloc_zeros::<f32>(chunks * p.k as usize)?;
        let mut fault = s.clone_htod(&[NO_FAULT])?;
        let (idx_len, val_len) = (t.idx.len() as u64, t.val.len() as u64);
        let (idx_full, val_full) = (lay.idx_full as u32, lay.val_full as u32);
        let n = lay.n;
        let vbits = p.values.bits();
        let tensor_scale = i32::from(p.scales == ScaleMode::Tensor);
        let compact = i32::from(p.indices == IndexEncoding::Compact);
        let mut b = s.launch_builder(&self.k.decode);
        b.arg(&idx)
            .arg(&idx_len)
            .arg(&idx_full)
            .arg(&val)
            .arg(&val_len)
            .arg(&val_full)
            .arg(&scales)
            .arg(&n)
            .arg(&p.chunk)
            .arg(&p.k)
            .arg(&vbits)
            .arg(&tensor_scale)
            .arg(&compact)
            .arg(&mut sp_idx)
            .arg(&mut sp_val)
            .arg(&mut fault);
        // SAFETY: matches `decode`; block sizes were checked against `ChunkLayout` above and the
        // kernel never reads past idx_len / val_len.
        unsafe { b.launch(launch_cfg(chunks, SPARSE_THREADS, 0)?) }?;
        let mut b = s.launch_builder(&self.k.scatter_add);
        b.arg(&sp_idx)
            .arg(&sp_val)
            .arg(&n)
            .arg(&p.chunk)
            .arg(&p.k)
            .arg(&weight)
            .arg(&fault)
            .arg(&mut *dense);
        // SAFETY: matches `scatter_add`; indices were range-checked by `decode`, and nothing
        // is written when it found a fault.
        unsafe { b.launch(launch_cfg(chunks, SPARSE_THREADS, 0)?) }?;
        let fault = s.clone_dtoh(&fault)?;
        if fault[0] != NO_FAULT {
            // The CPU checks name the fault precisely.
            validate(t)?;
            return Err(CodecError::Malformed(format!(
                "tensor {:?}: the device found a fault in chunk {}",
                t.name, fault[0]
            ))
            .into());
        }
        Ok(())
    }

    /// `codec::encode_update` with each tensor encoded on this GPU: tensors and their
    /// error-feedback buffers are copied in and the buffers back, for callers whose update
    /// is a file. A training loop keeps both on the device and calls `encode_tensor`.
    pub fn encode_update(
        &self,
        bytes: &[u8],
        state: &mut EfState,
        opts: &EncodeOptions,
    ) -> Result<EncodedUpdate, GpuError> {
        encode_update_with(bytes, state, opts, |input, buf| {
            let s = &self.stream;
            let data = s.clone_htod(input.data)?;
            let mut st = s.clone_htod(&*buf)?;
            let t = DeviceTensor {
                name: input.name,
                shape: input.shape,
                dtype: input.dtype,
                data: data.as_view(),
            };
            let enc = self.encode_tensor(&t, &mut st, opts.beta, &opts.params)?;
            s.memcpy_dtoh(&st, buf)?;
            Ok(enc)
        })
    }

    /// Fills `out` with the benchmark's data (see `fill_bench` in kernels.cu): a hash of the
    /// element index, so a PyTorch baseline can build the same values without a copy.
    pub fn fill_bench(
        &self,
        out: &mut CudaSlice<u8>,
        dtype: InDtype,
        seed: u32,
    ) -> Result<(), GpuError> {
        if dtype == InDtype::F16 {
            return Err(GpuError::Driver("benchmark data is f32 or bf16".into()));
        }
        let n = (out.len() / dtype.size()) as u64;
        let dt = dtype_code(dtype);
        let mut b = self.stream.launch_builder(&self.k.fill_bench);
        b.arg(&mut *out).arg(&dt).arg(&n).arg(&seed);
        // SAFETY: matches `fill_bench`; writes n elements of `dtype` into `out`.
        unsafe { b.launch(launch_cfg(4096, 256, 0)?) }?;
        Ok(())
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }
}

/// Compiles the kernels for a device of compute capability major.minor and loads them.
/// Machine code for the device's own architecture comes first: it needs no JIT, and a
/// driver older than the NVRTC at hand (same CUDA major version) loads it where it would
/// refuse that NVRTC's PTX. PTX for the device's architecture, then for older ones the
/// driver compiles forward, covers a GPU newer than the NVRTC. Every refusal is reported.
fn load_kernels(
    ctx: &Arc<CudaContext>,
    major: i32,
    minor: i32,
) -> Result<(Arc<CudaModule>, String), GpuError> {
    let mut tried = Vec::new();
    let sm = format!("sm_{major}{minor}");
    match compile_cubin(&sm).and_then(|c| Ok(ctx.load_module(Ptx::from_binary(c))?)) {
        Ok(m) => return Ok((m, sm)),
        Err(e) => tried.push(format!("{sm}: {e}")),
    }
    let mut archs: Vec<(i32, i32)> = vec![(major, minor), (9, 0), (8, 0)];
    archs.retain(|&a| a <= (major, minor));
    archs.dedup();
    for (ma, mi) in archs {
        let arch = format!("compute_{ma}{mi}");
        match compile(&arch).and_then(|p| Ok(ctx.load_module(p)?)) {
            Ok(m) => return Ok((m, arch)),
            Err(e) => tried.push(format!("{arch}: {e}")),
        }
    }
    Err(GpuError::Compile(tried.join("; ")))
}

/// The NVRTC options that keep the arithmetic identical to the CPU reference: no fused
/// multiply-add, no flush to zero, IEEE division and square root.
fn nvrtc_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--fmad=false".into(),
        "--ftz=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--std=c++17".into(),
    ]
}

/// NVRTC's C strings (a log, PTX) as text, without the closing NUL.
fn c_text(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles the kernel source for `arch` with NVRTC and hands the program to `take`, which
/// reads out what it needs (PTX or machine code) before the program is destroyed.
fn nvrtc<T>(
    arch: &str,
    take: impl FnOnce(nvrtc_sys::nvrtcProgram) -> Result<T, NvrtcError>,
) -> Result<T, GpuError> {
    let src = CString::new(KERNELS).map_err(|e| GpuError::Compile(e.to_string()))?;
    let prog = nvrtc_result::create_program(&src, None)
        .map_err(|e| GpuError::Compile(format!("{arch}: creating the program: {e:?}")))?;
    // SAFETY: `prog` was created above from `src`, which outlives it, and is destroyed
    // exactly once, at the end.
    let out = unsafe { nvrtc_result::compile_program(prog, &nvrtc_options(arch)) }
        .map_err(|e| {
            // SAFETY: as above; the log is read before the program is destroyed.
            let log = unsafe { nvrtc_result::get_program_log(prog) }
                .map(|l| c_text(&l))
                .unwrap_or_default();
            GpuError::Compile(format!("{arch}: {e:?}: {}", log.trim()))
        })
        .and_then(|()| take(prog).map_err(|e| GpuError::Compile(format!("{arch}: {e:?}"))));
    // SAFETY: as above.
    let _ = unsafe { nvrtc_result::destroy_program(prog) };
    out
}

/// Compiles the kernels to PTX for one virtual architecture (`compute_XY`), which the
/// driver compiles to machine code when it loads it.
pub fn compile(arch: &str) -> Result<Ptx, GpuError> {
    nvrtc(arch, |prog| {
        // SAFETY: `prog` is a compiled program that `nvrtc` destroys after this returns.
        let ptx = unsafe { nvrtc_result::get_ptx(prog) }?;
        Ok(Ptx::from_src(c_text(&ptx)))
    })
}

/// Compiles the kernels to machine code (an ELF cubin) for one real architecture
/// (`sm_XY`).
pub fn compile_cubin(arch: &str) -> Result<Vec<u8>, GpuError> {
    nvrtc(arch, |prog| {
        let mut size = 0usize;
        // SAFETY: `prog` is a compiled program that `nvrtc` destroys after this returns;
        // the buffer holds the `size` bytes NVRTC reports.
        unsafe {
            nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size).result()?;
            let mut cubin = vec![0u8; size];
            nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()).result()?;
            Ok(cubin)
        }
    })
}

/// Whether NVRTC can be loaded here (for tests that compile without a GPU).
pub fn nvrtc_present() -> bool {
    // SAFETY: only probes whether the shared library can be loaded.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver library can be loaded here.
pub fn driver_present() -> bool {
    // SAFETY: only probes whether the shared library can be loaded.
    unsafe { cudarc::driver::sys::is_culib_present() }
}
