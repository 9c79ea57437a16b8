//! Retry queues over the log (placeholder, filled in next).
//! x
