//! The interpreter's bounds and timings, in one module of their own so that the service and
//! its parts (contexts, kernels, drivers' frames, the stream) all read them from here.

use std::time::Duration;

/// Contexts `POST /interpreter/contexts` may create per sandbox; the default context of each
/// language (at most one each) comes on top.
pub const MAX_CONTEXTS: usize = 16;
/// Largest `code` of one execution, bytes.
pub const MAX_CODE_BYTES: usize = 1 << 20;
/// Largest request body of the interpreter's routes, bytes (the code, its env vars, the JSON).
pub const MAX_REQUEST_BYTES: usize = 2 << 20;
/// Largest value of one MIME entry of a result (base64 for binary formats), bytes; a larger entry
/// is left out, and a larger `text` is cut.
pub const MAX_RESULT_ENTRY_BYTES: usize = 4 << 20;
/// Largest frame a driver may send (one result with all its entries), bytes; a larger one is
/// dropped.
pub const MAX_FRAME_BYTES: usize = 16 << 20;
/// Most text of one `stdout` or `stderr` line of the stream, bytes; longer output is split across
/// several lines.
pub const MAX_OUTPUT_TEXT_BYTES: usize = 16 << 10;
/// Silence after which the stream carries a `keepalive` line.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Longest execution: past it the code is interrupted and the stream reports a `TimeoutError`.
pub const MAX_EXECUTION_TIME: Duration = Duration::from_secs(24 * 3600);
/// How long interrupted code may take to stop before its driver is killed (the context then
/// restarts, without its state, on its next use).
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(10);
/// Interval at which SIGINT is repeated while interrupted code has not stopped.
pub const INTERRUPT_REPEAT: Duration = Duration::from_secs(1);
/// How long a new driver may take to report that it is ready.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
