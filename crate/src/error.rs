//! The engine's one error type. Every message names what failed and, where a user can act,
//! what to do about it.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// No GPU adapter could be found (no WebGPU in the browser, no Vulkan/Metal/DX12 driver natively).
    NoAdapter(String),
    /// The adapter refused to create a device with the requested features / limits.
    RequestDevice(String),
    /// The device was lost (driver reset, `device.destroy()`, tab in the background too long).
    DeviceLost(String),
    /// A validation or out-of-memory error reported by the GPU API outside a pipeline build.
    Gpu(String),
    /// A WGSL shader or compute pipeline failed to build.
    Shader { shader: String, entry: String, defines: String, message: String },
    /// A shader name, entry point or define combination that does not exist.
    UnknownShader(String),
    /// Operand shapes do not fit the operation.
    Shape { op: &'static str, message: String },
    /// An operand's storage type is not supported by the operation.
    DType { op: &'static str, message: String },
    /// A buffer would exceed what the device allows.
    TooLarge { what: String, bytes: u64, limit: u64 },
    /// The device (or the configured memory limit) could not provide `bytes` more bytes for `what`.
    OutOfMemory { what: String, bytes: u64, message: String },
    /// Copying results back from the GPU failed.
    Readback(String),
    /// A host-side argument is invalid (e.g. data length does not match the shape).
    Invalid(String),
    /// Reading a file (or a byte range of one) failed.
    Io { file: String, message: String },
    /// A file's contents are malformed or unsupported; `tensor` names the entry when one is at fault.
    Format { file: String, tensor: Option<String>, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoAdapter(m) => write!(f, "no GPU adapter: {m}"),
            Error::RequestDevice(m) => write!(f, "could not create the GPU device: {m}"),
            Error::DeviceLost(m) => write!(f, "the GPU device was lost ({m}); reload to start again"),
            Error::Gpu(m) => write!(f, "GPU error: {m}"),
            Error::Shader { shader, entry, defines, message } => write!(
                f,
                "shader `{shader}` (entry `{entry}`, defines [{defines}]) failed to build: {message}"
            ),
            Error::UnknownShader(m) => write!(f, "unknown shader: {m}"),
            Error::Shape { op, message } => write!(f, "{op}: shape mismatch: {message}"),
            Error::DType { op, message } => write!(f, "{op}: unsupported storage type: {message}"),
            Error::TooLarge { what, bytes, limit } => write!(
                f,
                "{what} needs {bytes} bytes but this GPU allows at most {limit} bytes per buffer; \
                 use a smaller image or tensor size, or a quantized weight type for weights"
            ),
            Error::OutOfMemory { what, bytes, message } => write!(
                f,
                "the GPU ran out of memory allocating {bytes} bytes for {what} ({message}); \
                 use a smaller image size or a smaller weight type (q8_0 or q4_0), and close \
                 other pages or programs that use the GPU"
            ),
            Error::Readback(m) => write!(f, "reading results from the GPU failed: {m}"),
            Error::Invalid(m) => write!(f, "invalid argument: {m}"),
            Error::Io { file, message } => write!(f, "{file}: {message}"),
            Error::Format { file, tensor: Some(t), message } => write!(f, "{file}: tensor `{t}`: {message}"),
            Error::Format { file, tensor: None, message } => write!(f, "{file}: {message}"),
        }
    }
}

impl std::error::Error for Error {}

/// Shorthand for shape errors inside ops.
pub(crate) fn shape_err(op: &'static str, message: impl Into<String>) -> Error {
    Error::Shape { op, message: message.into() }
}
