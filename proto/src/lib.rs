//! Generated protobuf and gRPC code for cloudtap: the control plane
//! (`cloudtap.tunnel.v1`), the query service (`cloudtap.query.v1`), the replay service
//! (`cloudtap.replay.v1`) and the traffic
//! log's record envelope (`cloudtap.log.v1`).
//! Nothing here is written by hand; the `.proto` files beside this crate are the source.

#![allow(clippy::all, missing_docs)]

pub mod tunnel {
    pub mod v1 {
        tonic::include_proto!("cloudtap.tunnel.v1");
    }
}

pub mod log {
    pub mod v1 {
        tonic::include_proto!("cloudtap.log.v1");
    }
}

pub mod query {
    pub mod v1 {
        tonic::include_proto!("cloudtap.query.v1");
    }
}

pub mod replay {
    pub mod v1 {
        tonic::include_proto!("cloudtap.replay.v1");
    }
}
