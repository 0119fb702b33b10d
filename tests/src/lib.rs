//! Ferry's cross-service tests live in `tests/tests/`; this crate has no code.
