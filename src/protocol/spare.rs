//! Spare I/O buffers, kept per thread.
//!
//! An idle client holds no buffers (that is what keeps 5,000 idle clients small), so every
//! transaction used to allocate a 16 KiB read buffer and an output buffer and free both at the
//! end: the most expensive allocations on the hot path. A session going idle now hands its
//! empty buffers here, and the next session to wake on the same worker takes them back.

use std::cell::RefCell;

use bytes::BytesMut;

/// Buffers kept per thread: enough for every session a worker runs at once under load.
const MAX_SPARE: usize = 128;
/// Bigger buffers go back to the allocator: one large result should not stay resident.
const MAX_KEPT_CAPACITY: usize = 64 * 1024;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer: a spare one if this thread has any, else a new (unallocated) one.
pub fn take() -> BytesMut {
    SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default()
}

/// Hands back a buffer that is no longer needed; its contents are discarded.
pub fn give(mut buf: BytesMut) {
    if buf.capacity() == 0 || buf.capacity() > MAX_KEPT_CAPACITY {
        return;
    }
    buf.clear();
    SPARE.with(|s| {
        let mut spare = s.borrow_mut();
        if spare.len() < MAX_SPARE {
            spare.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_with_their_memory() {
        let mut b = BytesMut::with_capacity(4096);
        b.extend_from_slice(b"hello");
        let ptr = b.as_ptr();
        give(b);
        let again = take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.capacity() >= 4096);
        assert_eq!(take().capacity(), 0, "only one was given back");
    }

    #[test]
    fn huge_and_empty_buffers_are_not_kept() {
        give(BytesMut::new());
        give(BytesMut::with_capacity(MAX_KEPT_CAPACITY + 1));
        assert_eq!(take().capacity(), 0);
    }
}
