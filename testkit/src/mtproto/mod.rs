//! Loopback MTProto server (issue 3).
