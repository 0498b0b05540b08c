//! cloudtap query: a DataFusion context over the recorder's Parquet tables and the
//! log tail, served over gRPC, HTTP and Arrow Flight SQL.
//!
//! Nothing is implemented here yet: the query service is its own issue ("Ask the
//! traffic"), which needs the recorder's Parquet tables first. Until then
//! `cloudtapctl query` does not exist, rather than pretending to work.
