//! The server side of `OutboundPolicies`, sending [`OutboundPolicy`] with
//! weft's extension (the generated server can send only the published
//! message).

use std::sync::Arc;

use futures_util::Stream;
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::{Request, Response, Status};

use crate::wire::{OutboundPolicy, TrafficSpec};

const GET: &str = "/io.linkerd.proxy.outbound.OutboundPolicies/Get";
const WATCH: &str = "/io.linkerd.proxy.outbound.OutboundPolicies/Watch";

#[tonic::async_trait]
pub trait OutboundPolicies: Send + Sync + 'static {
    type WatchStream: Stream<Item = Result<OutboundPolicy, Status>> + Send + 'static;

    /// The policy now.
    async fn get(&self, request: Request<TrafficSpec>) -> Result<Response<OutboundPolicy>, Status>;

    /// The policy now, then again whenever it changes.
    async fn watch(
        &self,
        request: Request<TrafficSpec>,
    ) -> Result<Response<Self::WatchStream>, Status>;
}

/// A tonic service for [`OutboundPolicies`].
pub struct OutboundPoliciesServer<T> {
    inner: Arc<T>,
}

impl<T> OutboundPoliciesServer<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }
}

impl<T> Clone for OutboundPoliciesServer<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> tonic::server::NamedService for OutboundPoliciesServer<T> {
    const NAME: &'static str = crate::SERVICE;
}

struct GetSvc<T>(Arc<T>);

impl<T: OutboundPolicies> tonic::server::UnaryService<TrafficSpec> for GetSvc<T> {
    type Response = OutboundPolicy;
    type Future = BoxFuture<Response<OutboundPolicy>, Status>;

    fn call(&mut self, request: Request<TrafficSpec>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.get(request).await })
    }
}

struct WatchSvc<T>(Arc<T>);

impl<T: OutboundPolicies> tonic::server::ServerStreamingService<TrafficSpec> for WatchSvc<T> {
    type Response = OutboundPolicy;
    type ResponseStream = T::WatchStream;
    type Future = BoxFuture<Response<T::WatchStream>, Status>;

    fn call(&mut self, request: Request<TrafficSpec>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.watch(request).await })
    }
}

impl<T, B> Service<http::Request<B>> for OutboundPoliciesServer<T>
where
    T: OutboundPolicies,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        match req.uri().path() {
            GET => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(GetSvc(inner), req).await)
            }),
            WATCH => Box::pin(async move {
                // One stream per proxy per followed name, mostly idle.
                let mut grpc = tonic::server::Grpc::new(weft_channel::codec::Lean::default());
                Ok(grpc.server_streaming(WatchSvc(inner), req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}
