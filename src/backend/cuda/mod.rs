//! The CUDA side. For now: finding out, without panicking, whether a CUDA driver and devices
//! are usable (cudarc is built with dynamic loading and panics if libcuda is absent, so the
//! library is probed first). The backend itself comes with the kernels.

/// A CUDA device the driver reports.
#[derive(Debug, Clone)]
pub struct CudaDeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_memory: usize,
}

/// Devices usable through the CUDA driver, or why none are.
pub fn probe_devices() -> Result<Vec<CudaDeviceInfo>, String> {
    let lib_names = ["libcuda.so.1", "libcuda.so", "nvcuda.dll"];
    // SAFETY: loading the system's CUDA driver library runs its initialisers, as any CUDA
    // program does; nothing else is called through this handle.
    let found = lib_names
        .iter()
        .any(|n| unsafe { libloading::Library::new(*n) }.is_ok());
    if !found {
        return Err("no CUDA driver library (libcuda.so.1) on this machine".into());
    }
    let probe = std::panic::catch_unwind(|| -> Result<Vec<CudaDeviceInfo>, String> {
        use cudarc::driver::result;
        result::init().map_err(|e| format!("cuInit failed: {e}"))?;
        let n = result::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
        let mut out = Vec::new();
        for i in 0..n {
            let dev = result::device::get(i).map_err(|e| format!("cuDeviceGet({i}): {e}"))?;
            let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown".into());
            // SAFETY: `dev` is a valid device handle from cuDeviceGet.
            let total_memory = unsafe { result::device::total_mem(dev) }.unwrap_or(0);
            out.push(CudaDeviceInfo {
                ordinal: i as usize,
                name,
                total_memory,
            });
        }
        Ok(out)
    });
    match probe {
        Ok(r) => r,
        Err(_) => Err("the CUDA driver could not be initialised".into()),
    }
}

/// Kernel sources from `kernels/`, embedded by `build.rs` for NVRTC.
pub mod sources {
    include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));
}
