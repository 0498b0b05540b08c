//! Arrow Flight SQL, so ADBC, JDBC and other Flight SQL clients query captured
//! traffic directly. Served on the gRPC listener beside the control plane.
//!
//! A statement runs when its `GetFlightInfo` arrives: the answer carries the result
//! schema and one ticket, and the batches wait (at most [`TICKET_TTL`]) for the
//! `DoGet` that presents it, from the same identity. Authentication is the same
//! `authorization: Bearer <user token>` header as every other endpoint (ADBC:
//! `adbc.flight.sql.authorization_header`). Prepared statements, catalogs metadata
//! and updates are not offered: a client asking for them gets `Unimplemented`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    CommandGetSqlInfo, CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, Ticket,
};
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::service::{QueryService, authorization};
use crate::{QueryError, QueryOutput, Reader};

/// How long a started statement waits for the `DoGet` that fetches it.
pub const TICKET_TTL: Duration = Duration::from_secs(60);

static SQL_INFO: LazyLock<SqlInfoData> = LazyLock::new(|| {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "cloudtap");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
    b.append(SqlInfo::FlightSqlServerCancel, false);
    b.build().expect("static SQL info builds")
});

struct Pending {
    identity: String,
    started: Instant,
    output: QueryOutput,
}

/// The Flight SQL face of a [`QueryService`].
#[derive(Clone)]
pub struct FlightSql {
    service: QueryService,
    pending: Arc<Mutex<HashMap<Uuid, Pending>>>,
}

impl std::fmt::Debug for FlightSql {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightSql").finish_non_exhaustive()
    }
}

impl FlightSql {
    pub fn new(service: QueryService) -> Self {
        Self {
            service,
            pending: Arc::default(),
        }
    }

    pub fn grpc(self) -> FlightServiceServer<Self> {
        FlightServiceServer::new(self)
    }

    /// The reader a Flight call's `authorization` header names.
    async fn reader_of<T>(&self, request: &Request<T>) -> Result<Reader, Status> {
        self.service
            .reader(authorization(request).as_deref())
            .await
            .map_err(|e| e.to_status())
    }

    fn park(&self, identity: String, output: QueryOutput) -> Uuid {
        let handle = Uuid::now_v7();
        let mut pending = self.pending.lock().expect("pending poisoned");
        // Statements nobody fetched: dropped with their streams.
        pending.retain(|_, p| p.started.elapsed() < TICKET_TTL);
        pending.insert(
            handle,
            Pending {
                identity,
                started: Instant::now(),
                output,
            },
        );
        handle
    }
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        // Only bearer tokens: check it now so a bad one fails at connect time.
        self.reader_of(&request).await?;
        let auth = authorization(&request);
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: Default::default(),
        };
        let stream = futures::stream::once(async { Ok(reply) });
        let mut resp: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(Box::pin(stream));
        if let Some(a) = auth.and_then(|a| a.parse().ok()) {
            resp.metadata_mut().insert("authorization", a);
        }
        Ok(resp)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let reader = self.reader_of(&request).await?;
        let output = self
            .service
            .run_as(&reader, "flight_sql", &query.query, None)
            .await
            .map_err(|e| e.to_status())?;
        let schema = output.schema.clone();
        let handle = self.park(reader.identity, output);
        let ticket = TicketStatementQuery {
            statement_handle: handle.as_bytes().to_vec().into(),
        };
        let info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| QueryError::internal(e).to_status())?
            .with_endpoint(
                FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec())),
            )
            .with_descriptor(request.into_inner())
            .with_ordered(true);
        Ok(Response::new(info))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let reader = self.reader_of(&request).await?;
        let handle = Uuid::from_slice(&ticket.statement_handle)
            .map_err(|_| Status::invalid_argument("not a cloudtap statement ticket"))?;
        let pending = self
            .pending
            .lock()
            .expect("pending poisoned")
            .remove(&handle);
        let Some(p) = pending else {
            return Err(Status::not_found(format!(
                "no statement {handle} is waiting: tickets are good for one fetch within {}s of GetFlightInfo",
                TICKET_TTL.as_secs()
            )));
        };
        if p.identity != reader.identity {
            return Err(Status::permission_denied(
                "this ticket belongs to another identity",
            ));
        }
        let schema = p.output.schema.clone();
        let batches = p
            .output
            .batches
            .map_err(|e| arrow_flight::error::FlightError::Tonic(Box::new(e.to_status())));
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(Status::from)
            .boxed();
        Ok(Response::new(stream))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.reader_of(&request).await?;
        let ticket = Ticket::new(query.as_any().encode_to_vec());
        let info = FlightInfo::new()
            .try_with_schema(query.into_builder(&SQL_INFO).schema().as_ref())
            .map_err(|e| QueryError::internal(e).to_status())?
            .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
            .with_descriptor(request.into_inner());
        Ok(Response::new(info))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.reader_of(&request).await?;
        let builder = query.into_builder(&SQL_INFO);
        let schema = builder.schema();
        let batch = builder.build();
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(futures::stream::once(async { batch }))
            .map_err(Status::from)
            .boxed();
        Ok(Response::new(stream))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
