//! `EventService` served with each event encoded once for all its
//! subscribers.
//!
//! tonic's generated server takes a stream of `WatchResponse` values, so
//! every subscriber of a tenant got its own copy of each event (a string
//! allocation per field) and encoded it itself: with 32 subscribers beside
//! a flash sale, allocation and copying were the largest part of the
//! daemon's time (deploy/BENCHMARKS.md, "quiet shops watching", the
//! fan-out). Here the tap encodes an event once and each subscriber's
//! stream carries the same bytes ([`Bytes`] shares them). This is the
//! generated `EventServiceServer` with a codec that writes encoded
//! messages as they are; the wire, the reflection descriptors and the
//! clients are unchanged.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

use super::events::{EventApi, WatchStream};
use super::pb;

/// A `WatchResponse`, encoded.
pub fn encode(event: &pb::WatchResponse) -> Bytes {
    Bytes::from(event.encode_to_vec())
}

/// `holdfast.v1.EventService` over [`EventApi`].
#[derive(Clone)]
pub struct EventServer {
    api: Arc<EventApi>,
    max_decoding_message_size: usize,
}

impl EventServer {
    /// Serves `api`, refusing requests larger than `max_decoding_message_size`.
    pub fn new(api: EventApi, max_decoding_message_size: usize) -> Self {
        Self {
            api: Arc::new(api),
            max_decoding_message_size,
        }
    }
}

impl NamedService for EventServer {
    const NAME: &'static str = pb::event_service_server::SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for EventServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != "/holdfast.v1.EventService/Watch" {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let api = self.api.clone();
        let max = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc =
                Grpc::new(WireCodec::default()).apply_max_message_size_config(Some(max), None);
            Ok(grpc.server_streaming(Watch(api), req).await)
        })
    }
}

/// The `Watch` method.
struct Watch(Arc<EventApi>);

impl ServerStreamingService<pb::WatchRequest> for Watch {
    type Response = Bytes;
    type ResponseStream = WatchStream;
    type Future = BoxFuture<Response<WatchStream>, Status>;

    fn call(&mut self, request: Request<pb::WatchRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.watch(request).await })
    }
}

/// Decodes requests as tonic's prost codec does; writes responses that
/// are encoded already.
#[derive(Default)]
struct WireCodec(ProstCodec<pb::WatchResponse, pb::WatchRequest>);

impl Codec for WireCodec {
    type Encode = Bytes;
    type Decode = pb::WatchRequest;
    type Encoder = Encoded;
    type Decoder = <ProstCodec<pb::WatchResponse, pb::WatchRequest> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        Encoded
    }

    fn decoder(&mut self) -> Self::Decoder {
        self.0.decoder()
    }
}

/// Writes an encoded message as it is.
struct Encoded;

impl Encoder for Encoded {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_event_decodes_to_itself() {
        let event = pb::WatchResponse {
            event_id: "1700000000000-3".into(),
            kind: "claimed".into(),
            hold_id: "h1".into(),
            lines: vec![pb::EventLine {
                pool_id: "p".into(),
                quantity: 2,
            }],
            ..Default::default()
        };
        let bytes = encode(&event);
        assert_eq!(pb::WatchResponse::decode(bytes).unwrap(), event);
    }
}
