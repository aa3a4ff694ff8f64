//! Forwarding one decided request: the policy, the body (streamed, or read for the policy
//! within its limits), the payer's token, the upstream call, and the one 401 replay.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{
    self, BodyShared, ReplayBody, RequestBody, RequestBodySettings, RequestGuard, UpstreamBody,
};
use super::budget::Reservation;
use super::error::ProxyError;
use super::inspect::{Policy, Verdict};
use super::path::Endpoint;
use super::replay::ReplayHead;
use super::report::Charge;
use super::resolve::clients::Client;
use super::resolve::Payer;
use super::{content_length, headers, is_json, Proxy};
use crate::client::pool::PooledBody;
use crate::metrics::Metrics;
use crate::signed::SignedKey;
use crate::token::refresher::error_chain;

/// What [`super::resolve::Resolver`] decided, owned: the upstream URI, the caller, the payer.
#[derive(Debug)]
pub(super) struct Decision {
    pub upstream_uri: http::Uri,
    pub client: Arc<Client>,
    pub payer: Payer,
    pub signed: Option<Arc<SignedKey>>,
}

/// The request body on its way up: read whole for the policy, or streamed.
enum Outgoing {
    Buffered(Bytes),
    Streaming(Incoming),
}

impl Proxy {
    /// Forwards a request whose route, caller and payer are decided.
    pub(super) async fn forward(
        &self,
        req: Request<Incoming>,
        decision: Decision,
        endpoint: Endpoint,
        start: Instant,
        guard: &mut RequestGuard,
    ) -> Result<Response<PooledBody>, ProxyError> {
        let inner = &*self.inner;
        let settings = &inner.settings;
        let Decision { upstream_uri, client, payer, signed } = decision;
        // A signed key narrows its client's policy: its models, its cap, usage on every stream
        // when it has a budget.
        let narrowed = signed
            .as_ref()
            .map(|k| client.policy.narrowed(k.models(), k.max_tokens(), k.budget_tokens().is_some()));
        let policy = narrowed.as_ref().unwrap_or(&*client.policy);
        let has_body = !http_body::Body::is_end_stream(req.body());
        let encoding = req.headers().get(http::header::CONTENT_ENCODING).map(|v| v.as_bytes());
        if let Err(e) = policy.admit(req.method(), endpoint, req.uri().path(), has_body, encoding) {
            inner.metrics.policy_rejections_total.with_label_values(&[e.reason()]).inc();
            self.count_signed(&signed, "out_of_scope");
            return Err(ProxyError::Policy(e));
        }
        if let Some(key) = &signed {
            self.admit_budget(key, policy, guard).await?;
        }
        if let Some((slots, limit)) = &client.slots {
            let slot = Arc::clone(slots).try_acquire_owned().map_err(|_| ProxyError::ClientOverloaded {
                client: Arc::clone(&client.name),
                limit: *limit,
            })?;
            guard.hold_client(slot);
        }
        let declared = content_length(&req);
        if declared.is_some_and(|len| len > settings.max_body) {
            return Err(ProxyError::PayloadTooLarge {
                limit: settings.max_body,
                key: "server.max_request_body_bytes",
            });
        }
        let (mut parts, incoming) = req.into_parts();
        // The request policy reads JSON bodies of the endpoints it applies to (within its body
        // limit, deadline and the buffer budget); everything else streams through untouched.
        let mut held = None;
        let outgoing = if policy.applies(endpoint)
            && parts.method == Method::POST
            && (policy.enforces() || is_json(&parts.headers))
        {
            let (bytes, reservation) = self.read_for_policy(policy, incoming, declared).await?;
            held = Some(reservation);
            Outgoing::Buffered(self.inspect(policy, endpoint, bytes, &mut parts.headers, guard)?)
        } else {
            Outgoing::Streaming(incoming)
        };
        // Freshness is judged now, not when the request arrived: queueing and reading the body
        // for the policy take time.
        let token = self.token_for(&payer).await?;
        let tokens = payer.store();
        if let Some(a) = guard.access() {
            a.credential = Some(Arc::from(token.credential()));
        }
        parts.uri = upstream_uri;
        parts.version = Version::HTTP_11;
        headers::prepare_request(&mut parts.headers);
        let size = match &outgoing {
            Outgoing::Buffered(bytes) => Some(bytes.len() as u64),
            Outgoing::Streaming(_) => declared,
        };
        let replayable =
            settings.replay_capacity > 0 && size.is_none_or(|len| len <= settings.replay_capacity);
        // Kept only to rebuild the request for a replay after a 401.
        let saved = replayable.then(|| ReplayHead::capture(&parts.method, &parts.uri, &parts.headers));
        let shared = Arc::new(BodyShared::default());
        let (body, buffered) = match outgoing {
            Outgoing::Buffered(bytes) => {
                (UpstreamBody::Replay { body: ReplayBody::new(vec![bytes.clone()]) }, Some(bytes))
            }
            Outgoing::Streaming(incoming) => {
                let sniff_model = settings.usage_scan && endpoint.carries_usage() && is_json(&parts.headers);
                if sniff_model {
                    guard.watch_model(shared.model());
                }
                let body_settings = RequestBodySettings {
                    limit: settings.max_body,
                    replay_capacity: replayable.then_some(settings.replay_capacity),
                    budget: settings.buffer.clone(),
                    stall: settings.body_read_timeout,
                    sniff_model,
                };
                let body = RequestBody::new(incoming, body_settings, Arc::clone(&shared));
                (UpstreamBody::Streaming { body }, None)
            }
        };
        parts.headers.insert(AUTHORIZATION, token.header().clone());
        let req = Request::from_parts(parts, body);

        let resp = self.send(req, endpoint, start, &shared).await;
        if shared.over_budget() {
            inner.metrics.buffer_exhausted_total.with_label_values(&["replay"]).inc();
        }
        let resp = resp?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        inner.metrics.upstream_unauthorized_total.inc();
        let chunks = match buffered {
            Some(bytes) => Some(vec![bytes]),
            None => shared.replayable(),
        };
        let (Some((method, uri, headers)), Some(chunks)) = (saved.and_then(ReplayHead::restore), chunks)
        else {
            // Not replayable (too large, or still streaming): pass the 401 through, but get the
            // next request a fresh token.
            tokens.report_rejected(token.generation());
            return Ok(resp);
        };
        let Some(fresh) = tokens.replace_rejected(token.generation(), settings.forced_refresh_wait).await
        else {
            return Ok(resp);
        };
        drop(resp);
        tracing::debug!(
            endpoint = endpoint.as_str(),
            "Replaying a request rejected with 401 using a fresh token"
        );
        inner.metrics.request_replays_total.inc();
        if let Some(a) = guard.access() {
            a.replayed = true;
            a.credential = Some(Arc::from(fresh.credential()));
        }
        let mut req = Request::new(UpstreamBody::Replay { body: ReplayBody::new(chunks) });
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        req.headers_mut().insert(AUTHORIZATION, fresh.header().clone());
        let resp = self.send(req, endpoint, start, &shared).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            inner.metrics.upstream_unauthorized_total.inc();
        }
        drop(held);
        Ok(resp)
    }

    /// Reads a body for the policy: at most `policy.max_body_bytes`, the whole of it within
    /// `server.body_read_timeout_secs`, every byte reserved in `server.max_buffered_bytes`.
    async fn read_for_policy(
        &self,
        policy: &Policy,
        mut body: Incoming,
        declared: Option<u64>,
    ) -> Result<(Bytes, Reservation), ProxyError> {
        let settings = &self.inner.settings;
        let limit = policy.max_body();
        let too_large = || ProxyError::PayloadTooLarge { limit, key: "policy.max_body_bytes" };
        if declared.is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        // Bytes are reserved as they arrive, not as declared: silent clients declaring large
        // bodies hold nothing.
        let mut reservation = settings.buffer.reservation();
        let full = |m: &Metrics| {
            m.buffer_exhausted_total.with_label_values(&["policy"]).inc();
            ProxyError::BufferFull
        };
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut size = 0u64;
        // The whole read, not each piece: a client trickling a byte at a time must not hold its
        // slot and its bytes for longer than this either.
        let deadline = body::deadline_after(Instant::now(), settings.body_read_timeout);
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(ProxyError::BodyTimeout(settings.body_read_timeout)),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(ProxyError::ClientBody(e.into())),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else { continue };
            size += data.len() as u64;
            if size > limit {
                return Err(too_large());
            }
            if !reservation.ensure(size) {
                return Err(full(&self.inner.metrics));
            }
            chunks.push(data);
        }
        let bytes = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.pop().unwrap_or_default(),
            _ => Bytes::from(chunks.concat()),
        };
        Ok((bytes, reservation))
    }

    /// Applies the request policy to a body read whole.
    fn inspect(
        &self,
        policy: &Policy,
        endpoint: Endpoint,
        bytes: Bytes,
        headers: &mut http::HeaderMap,
        guard: &mut RequestGuard,
    ) -> Result<Bytes, ProxyError> {
        let inner = &*self.inner;
        match policy.inspect(endpoint, &bytes) {
            Ok(Verdict::Unchanged { model }) => {
                guard.set_request_model(model);
                Ok(bytes)
            }
            Ok(Verdict::Rewritten { body, model }) => {
                inner.metrics.policy_rewrites_total.inc();
                // The client's length no longer holds; hyper sets it from the new body.
                headers.remove(CONTENT_LENGTH);
                guard.set_request_model(model);
                Ok(body)
            }
            Err(e) => {
                inner.metrics.policy_rejections_total.with_label_values(&[e.reason()]).inc();
                if guard.signed() {
                    self.count_signed_reason("out_of_scope");
                }
                Err(ProxyError::Policy(e))
            }
        }
    }

    /// Sends upstream and waits for the response headers, bounded by the idle timeout and the
    /// request deadline.
    async fn send(
        &self,
        req: Request<UpstreamBody>,
        endpoint: Endpoint,
        start: Instant,
        shared: &BodyShared,
    ) -> Result<Response<PooledBody>, ProxyError> {
        let inner = &*self.inner;
        let settings = &inner.settings;
        let mut wait = settings.idle_timeout;
        if let Some(total) = settings.request_timeout {
            wait = wait.min(total.saturating_sub(start.elapsed()));
        }
        match tokio::time::timeout(wait, inner.upstream.request(req)).await {
            Err(_) => Err(ProxyError::Timeout(wait)),
            Ok(Err(_)) if shared.too_large() => Err(ProxyError::PayloadTooLarge {
                limit: settings.max_body,
                key: "server.max_request_body_bytes",
            }),
            Ok(Err(_)) if shared.stalled() => Err(ProxyError::BodyTimeout(settings.body_read_timeout)),
            Ok(Err(_)) if shared.client_failed() => Err(ProxyError::ClientAborted),
            Ok(Err(e)) => Err(ProxyError::Unreachable(e)),
            Ok(Ok(resp)) => {
                inner.metrics.upstream_response(endpoint).observe(start.elapsed().as_secs_f64());
                Ok(resp)
            }
        }
    }

    /// A signed key with a budget: admitted while what it used is below its budget (the request
    /// that crosses it completes), charged when it ends. A store that cannot be read refuses
    /// (503) unless `signed_keys.budget_fail_open`.
    async fn admit_budget(
        &self,
        key: &Arc<SignedKey>,
        policy: &Policy,
        guard: &mut RequestGuard,
    ) -> Result<(), ProxyError> {
        let (Some(budget), Some(budgets), Some(jti)) =
            (key.budget_tokens(), &self.inner.settings.budgets, key.jti())
        else {
            return Ok(());
        };
        let used = match budgets.ledger.used(jti).await {
            Ok(used) => Some(used),
            Err(e) => {
                budgets.results.with_label_values(&["budget_unavailable"]).inc();
                tracing::warn!(
                    jti = %crate::ledger::jti_tag(jti),
                    error = %error_chain(&e),
                    fail_open = budgets.fail_open,
                    "Cannot read a signed key's budget"
                );
                if !budgets.fail_open {
                    return Err(ProxyError::BudgetUnavailable);
                }
                None
            }
        };
        if let Some(used) = used {
            if !crate::ledger::admits(used, budget) {
                budgets.results.with_label_values(&["budget_exhausted"]).inc();
                return Err(ProxyError::BudgetExhausted);
            }
        }
        let left = budget.saturating_sub(used.unwrap_or(0));
        guard.charge(Charge {
            ledger: budgets.ledger.clone(),
            key: Arc::clone(key),
            fallback: policy.max_tokens().unwrap_or(left).min(left.max(1)),
            results: budgets.results.clone(),
            runtime: budgets.runtime.clone(),
        });
        Ok(())
    }

    fn count_signed(&self, signed: &Option<Arc<SignedKey>>, result: &str) {
        if signed.is_some() {
            self.count_signed_reason(result);
        }
    }

    fn count_signed_reason(&self, result: &str) {
        if let Some(gate) = self.inner.settings.resolver.signed() {
            gate.results.with_label_values(&[result]).inc();
        }
    }

    /// The payer's token to send now. A caller-supplied pair may still be on its first fetch:
    /// wait for it (bounded); a pair the IAM rejects is forgotten and its caller told so.
    async fn token_for(&self, payer: &Payer) -> Result<Arc<crate::token::Token>, ProxyError> {
        let settings = &self.inner.settings;
        let result = match payer {
            Payer::Set(set) => set.store().current(Instant::now()),
            Payer::Pair(pair) => pair.store.wait_ready(settings.forced_refresh_wait).await,
        };
        let now = Instant::now();
        result.map_err(|u| {
            if let (Payer::Pair(pair), true) = (payer, u.rejected) {
                if let Some(cache) = settings.resolver.pairs() {
                    cache.evict(pair);
                }
                return ProxyError::PairRejected { reason: u.message };
            }
            ProxyError::NoToken {
                retry_after_secs: u.retry_after_secs(now),
                message: format!("credential set '{}': {}", payer.name(), u.message),
            }
        })
    }
}
