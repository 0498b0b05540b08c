//! cloudtap replay: rebuilds a captured session from the traffic log (or Parquet),
//! re-sends it through the edge against staging, and reports what changed.
//!
//! Nothing is implemented here yet: replay is its own issue ("Replay against
//! staging"), which needs the recorder's Parquet tables and HTTP mirroring first.
//! Until then `cloudtapctl replay` does not exist, rather than pretending to work.
