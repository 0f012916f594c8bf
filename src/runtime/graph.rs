//! Capturing the ops issued on a stream into a CUDA graph, and replaying it.

use super::device::Device;
use crate::error::{CudaContextExt, Error, Result};
use cudarc::driver::sys;

/// An instantiated graph. Not safe to launch from two threads at once (the C header says so).
pub struct Graph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

// The handles may move between threads; concurrent use is excluded by the API contract.
unsafe impl Send for Graph {}

fn refuse_null(stream: sys::CUstream) -> Result<()> {
    if stream.is_null() {
        return Err(Error::invalid(
            "stream: graph capture cannot run on the legacy NULL stream; create a stream for it",
        ));
    }
    Ok(())
}

/// Starts capturing everything issued on `stream` (global mode: any unsafe call from any thread during
/// the capture fails it, which is how a hidden synchronisation or allocation is caught).
///
/// # Safety
/// `stream` must be a valid stream of the device's context.
pub unsafe fn begin_capture(device: &Device, stream: sys::CUstream) -> Result<()> {
    refuse_null(stream)?;
    device.bind()?;
    sys::cuStreamBeginCapture_v2(stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL)
        .result()
        .during("cuStreamBeginCapture")
}

/// Ends the capture on `stream` and instantiates the graph.
///
/// # Safety
/// `stream` must be the stream given to [`begin_capture`].
pub unsafe fn end_capture(device: &Device, stream: sys::CUstream) -> Result<Graph> {
    refuse_null(stream)?;
    device.bind()?;
    let mut graph = std::ptr::null_mut();
    sys::cuStreamEndCapture(stream, &mut graph).result().during("cuStreamEndCapture")?;
    if graph.is_null() {
        return Err(Error::invalid("stream: no capture was in progress on this stream"));
    }
    let mut exec = std::ptr::null_mut();
    if let Err(e) = sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0).result().during("cuGraphInstantiate") {
        sys::cuGraphDestroy(graph);
        return Err(e);
    }
    Ok(Graph { graph, exec })
}

impl Graph {
    /// Replays the graph on `stream`.
    ///
    /// # Safety
    /// `stream` must be a valid stream of the context the graph was captured in.
    pub unsafe fn launch(&self, device: &Device, stream: sys::CUstream) -> Result<()> {
        device.bind()?;
        sys::cuGraphLaunch(self.exec, stream).result().during("cuGraphLaunch")
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe {
            sys::cuGraphExecDestroy(self.exec);
            sys::cuGraphDestroy(self.graph);
        }
    }
}
