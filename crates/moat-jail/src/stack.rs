//! A stack of its own for a child started with `clone(CLONE_VM)`: it shares the parent's memory,
//! so it must not run on the parent's stack.

use crate::{JailError, Result};

const PAGE: usize = 4096;

/// An anonymous mapping with an inaccessible guard page at its low end.
#[derive(Debug)]
pub(crate) struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it may be unmapped from any thread.
unsafe impl Send for ChildStack {}
// SAFETY: shared references only read the mapping's address.
unsafe impl Sync for ChildStack {}

impl ChildStack {
    /// A stack with `size` usable bytes; `what` names it in an error.
    pub(crate) fn new(size: usize, what: &str) -> Result<ChildStack> {
        let len = size + PAGE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(JailError::last_os(format!("map {what}")));
        }
        let stack = ChildStack { base, len };
        // SAFETY: the lowest page of the mapping we just made.
        if unsafe { libc::mprotect(base, PAGE, libc::PROT_NONE) } != 0 {
            return Err(JailError::last_os(format!("guard {what}")));
        }
        Ok(stack)
    }

    /// The initial stack pointer: the mapping's end (page-aligned, so 16-byte aligned).
    pub(crate) fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of our own mapping.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping; its owner drops it only once the child has executed its
        // program or exited.
        unsafe { libc::munmap(self.base, self.len) };
    }
}
