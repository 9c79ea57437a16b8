//! Pure state machines: no I/O, time passed in as a value.
