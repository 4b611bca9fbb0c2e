//! HTTP routing, request handling and watch streams.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, header};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;

use crate::errors::ApiError;
use crate::resources::{self, ResourceDef};
use crate::select::{FieldSelector, LabelSelector};
use crate::store::{
    DeleteOpts, Event, EventKind, ListPage, State, Sub, WriteOpts, present, res_key,
};
use crate::table::{IncludeObject, partial_metadata, table};
use crate::util::{Query, path_decode};
use crate::{RecordedRequest, TokenReviewAnswer, TokenReviewRequest};

const MAX_BODY: usize = 32 * 1024 * 1024;
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) type TokenHook = dyn Fn(&TokenReviewRequest) -> TokenReviewAnswer + Send + Sync;

pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    pub(crate) token_review: Mutex<Arc<TokenHook>>,
    pub(crate) drop_tx: watch::Sender<u64>,
    pub(crate) shutdown_tx: watch::Sender<bool>,
    pub(crate) addr: SocketAddr,
    pub(crate) open_watches: AtomicUsize,
    pub(crate) aggregated_discovery: AtomicBool,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Response body: a whole buffer, or a stream of chunks (watch).
pub(crate) enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

fn respond(code: u16, content_type: &str, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Body::Full(Some(Bytes::from(body))));
    *r.status_mut() = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache, private"),
    );
    r
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    respond(code, "application/json", v.to_string().into_bytes())
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status())
}

/// Accept loop; ends when `shutdown` turns true.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown_tx.subscribe();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|v| *v) => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                        tracing::debug!("fake apiserver connection ended: {e}");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

struct Ctx {
    method: Method,
    path: String,
    query: Query,
    headers: HeaderMap,
    body: Bytes,
}

impl Ctx {
    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return error_response(&ApiError::new(
                413,
                "RequestEntityTooLarge",
                format!("could not read the request body: {e}"),
            ));
        }
    };
    let ctx = Ctx {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: Query::parse(parts.uri.query()),
        headers: parts.headers,
        body,
    };
    shared.lock().record(RecordedRequest {
        method: ctx.method.to_string(),
        path: ctx.path.clone(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        content_type: ctx.header(header::CONTENT_TYPE).map(str::to_string),
        accept: ctx.header(header::ACCEPT).map(str::to_string),
        headers: ctx
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: ctx.body.to_vec(),
    });
    match route(&shared, &ctx) {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

fn only_get(ctx: &Ctx) -> Result<(), ApiError> {
    if ctx.method == Method::GET || ctx.method == Method::HEAD {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({})",
            ctx.method
        )))
    }
}

fn route(shared: &Arc<Shared>, ctx: &Ctx) -> Result<Response<Body>, ApiError> {
    let segs: Vec<String> = ctx
        .path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(path_decode)
        .collect();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    match s.as_slice() {
        [] => {
            only_get(ctx)?;
            let st = shared.lock();
            let mut paths = vec![
                "/api".to_string(),
                "/api/v1".into(),
                "/apis".into(),
                "/healthz".into(),
                "/livez".into(),
                "/readyz".into(),
                "/version".into(),
            ];
            for d in st.defs.iter().filter(|d| !d.group.is_empty()) {
                for p in [
                    format!("/apis/{}", d.group),
                    format!("/apis/{}", d.api_version()),
                ] {
                    if !paths.contains(&p) {
                        paths.push(p);
                    }
                }
            }
            paths.sort();
            Ok(json_response(200, &json!({ "paths": paths })))
        }
        ["version"] => {
            only_get(ctx)?;
            Ok(json_response(200, &resources::version_info()))
        }
        ["healthz" | "livez" | "readyz", ..] => {
            only_get(ctx)?;
            Ok(respond(200, "text/plain; charset=utf-8", b"ok".to_vec()))
        }
        ["api" | "apis"] => {
            only_get(ctx)?;
            let core = s[0] == "api";
            if shared.aggregated_discovery.load(Ordering::SeqCst)
                && let Some(version) = wants_aggregated(ctx)
            {
                let st = shared.lock();
                let doc = resources::aggregated_discovery(
                    &st.defs,
                    core,
                    &format!("apidiscovery.k8s.io/{version}"),
                );
                return Ok(respond(
                    200,
                    &format!(
                        "application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList"
                    ),
                    doc.to_string().into_bytes(),
                ));
            }
            if core {
                Ok(json_response(
                    200,
                    &resources::api_versions(&shared.addr.to_string()),
                ))
            } else {
                let st = shared.lock();
                Ok(json_response(200, &resources::api_group_list(&st.defs)))
            }
        }
        ["api", "v1"] => {
            only_get(ctx)?;
            let st = shared.lock();
            resources::api_resource_list(&st.defs, "", "v1")
                .map(|v| json_response(200, &v))
                .ok_or_else(ApiError::resource_not_found)
        }
        ["apis", group] => {
            only_get(ctx)?;
            let st = shared.lock();
            resources::api_group(&st.defs, group)
                .map(|v| json_response(200, &v))
                .ok_or_else(ApiError::resource_not_found)
        }
        ["apis", group, version] => {
            only_get(ctx)?;
            let st = shared.lock();
            resources::api_resource_list(&st.defs, group, version)
                .map(|v| json_response(200, &v))
                .ok_or_else(ApiError::resource_not_found)
        }
        ["api", "v1", rest @ ..] => resource_request(shared, ctx, "", "v1", rest),
        ["apis", group, version, rest @ ..] => resource_request(shared, ctx, group, version, rest),
        _ => Err(ApiError::resource_not_found()),
    }
}

/// Splits the part after `/api/v1` or `/apis/g/v` into (namespace, plural, name, subresource).
#[allow(clippy::type_complexity)]
fn parse_rest<'a>(
    rest: &[&'a str],
) -> Option<(Option<&'a str>, &'a str, Option<&'a str>, Option<&'a str>)> {
    Some(match *rest {
        [plural] => (None, plural, None, None),
        [plural, name] => (None, plural, Some(name), None),
        ["namespaces", name, sub @ ("status" | "finalize")] => {
            (None, "namespaces", Some(name), Some(sub))
        }
        ["namespaces", ns, plural] => (Some(ns), plural, None, None),
        ["namespaces", ns, plural, name] => (Some(ns), plural, Some(name), None),
        ["namespaces", ns, plural, name, sub] => (Some(ns), plural, Some(name), Some(sub)),
        [plural, name, sub] => (None, plural, Some(name), Some(sub)),
        _ => return None,
    })
}

/// `v2`/`v2beta1` when the Accept header prefers aggregated discovery.
fn wants_aggregated(ctx: &Ctx) -> Option<&'static str> {
    let accept = ctx.header(header::ACCEPT)?;
    for part in accept.split(',') {
        let mut it = part.split(';').map(str::trim);
        let media = it.next().unwrap_or_default().to_ascii_lowercase();
        let params: Vec<(&str, &str)> = it.filter_map(|p| p.split_once('=')).collect();
        let param = |k: &str| params.iter().find(|(pk, _)| *pk == k).map(|(_, v)| *v);
        match (param("as"), param("g"), param("v")) {
            (Some("APIGroupDiscoveryList"), Some("apidiscovery.k8s.io"), Some("v2")) => {
                return Some("v2");
            }
            (Some("APIGroupDiscoveryList"), Some("apidiscovery.k8s.io"), Some("v2beta1")) => {
                return Some("v2beta1");
            }
            (None, _, _)
                if matches!(media.as_str(), "application/json" | "*/*" | "application/*") =>
            {
                return None;
            }
            _ => {}
        }
    }
    None
}

/// How the client wants objects rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Json,
    Metadata,
    Table(IncludeObject),
}

fn output_mode(ctx: &Ctx) -> Output {
    let accept = ctx.header(header::ACCEPT).unwrap_or("application/json");
    for part in accept.split(',') {
        let mut it = part.split(';').map(str::trim);
        let media = it.next().unwrap_or_default().to_ascii_lowercase();
        let params: Vec<(&str, &str)> = it.filter_map(|p| p.split_once('=')).collect();
        let param = |k: &str| params.iter().find(|(pk, _)| *pk == k).map(|(_, v)| *v);
        match param("as") {
            Some("Table") if param("g") == Some("meta.k8s.io") => {
                let include = match ctx.query.get("includeObject") {
                    Some("None") => IncludeObject::None,
                    Some("Object") => IncludeObject::Object,
                    _ => IncludeObject::Metadata,
                };
                return Output::Table(include);
            }
            Some("PartialObjectMetadata" | "PartialObjectMetadataList")
                if param("g") == Some("meta.k8s.io") =>
            {
                return Output::Metadata;
            }
            Some(_) => continue,
            None => {
                if matches!(
                    media.as_str(),
                    "application/json" | "*/*" | "application/*" | ""
                ) {
                    return Output::Json;
                }
            }
        }
    }
    Output::Json
}

fn render_object(def: &ResourceDef, obj: &Value, out: Output) -> Value {
    let o = present(def, obj);
    match out {
        Output::Json => o,
        Output::Metadata => partial_metadata(&o),
        Output::Table(inc) => {
            let rv = o
                .pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(Value::Null);
            table(def, &[o], json!({ "resourceVersion": rv }), inc)
        }
    }
}

fn render_list(def: &ResourceDef, page: ListPage, out: Output) -> Value {
    let mut md = json!({"resourceVersion": page.rv.to_string()});
    if let Some(c) = page.cont {
        md["continue"] = json!(c);
        if let Some(r) = page.remaining {
            md["remainingItemCount"] = json!(r);
        }
    }
    match out {
        Output::Json => json!({
            "kind": def.list_kind,
            "apiVersion": def.api_version(),
            "metadata": md,
            "items": page.items,
        }),
        Output::Metadata => json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": md,
            "items": page.items.iter().map(partial_metadata).collect::<Vec<_>>(),
        }),
        Output::Table(inc) => table(def, &page.items, md, inc),
    }
}

fn parse_body(ctx: &Ctx) -> Result<Value, ApiError> {
    let ct = ctx
        .header(header::CONTENT_TYPE)
        .unwrap_or("application/json")
        .to_ascii_lowercase();
    if ct.starts_with("application/vnd.kubernetes.protobuf") {
        return crate::proto::decode(&ctx.body).map_err(|e| {
            if e.starts_with("the fake") {
                ApiError::unsupported_media_type(e)
            } else {
                ApiError::bad_request(format!("error decoding protobuf: {e}"))
            }
        });
    }
    if ct.contains("protobuf") || ct.contains("cbor") {
        return Err(ApiError::unsupported_media_type(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {ct})"
        )));
    }
    if ct.contains("yaml") {
        return serde_yaml::from_slice(&ctx.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")));
    }
    serde_json::from_slice(&ctx.body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })
}

fn write_opts(ctx: &Ctx) -> Result<WriteOpts, ApiError> {
    let dry_run = match ctx.query.get("dryRun") {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Invalid dry run value: {other:?}: supported values: \"All\""
            )));
        }
    };
    Ok(WriteOpts {
        dry_run,
        field_manager: ctx.query.get("fieldManager").map(str::to_string),
    })
}

fn delete_opts(ctx: &Ctx) -> Result<DeleteOpts, ApiError> {
    let mut o = DeleteOpts {
        dry_run: write_opts(ctx)?.dry_run,
        ..DeleteOpts::default()
    };
    if !ctx.body.iter().all(u8::is_ascii_whitespace) {
        let body = parse_body(ctx)?;
        let s = |p: &str| body.pointer(p).and_then(Value::as_str).map(str::to_string);
        o.uid = s("/preconditions/uid");
        o.resource_version = s("/preconditions/resourceVersion");
        if body
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|v| v == "All"))
        {
            o.dry_run = true;
        }
    }
    Ok(o)
}

fn check_verb(def: &ResourceDef, verb: &str) -> Result<(), ApiError> {
    if def.has_verb(verb) {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({verb} {})",
            def.qualified()
        )))
    }
}

fn selectors(def: &ResourceDef, ctx: &Ctx) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(ctx.query.get("labelSelector").unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(
        ctx.query.get("fieldSelector").unwrap_or_default(),
        &def.selectable_fields,
    )
    .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

fn resource_request(
    shared: &Arc<Shared>,
    ctx: &Ctx,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Response<Body>, ApiError> {
    let (ns, plural, name, sub) = parse_rest(rest).ok_or_else(ApiError::resource_not_found)?;
    let def = shared
        .lock()
        .find_def(group, version, plural)
        .ok_or_else(ApiError::resource_not_found)?;
    if (!def.namespaced && ns.is_some()) || (def.namespaced && ns.is_none() && name.is_some()) {
        return Err(ApiError::resource_not_found());
    }
    let sub = match sub {
        None => Sub::Main,
        Some("status") if def.status_subresource => Sub::Status,
        Some(_) => return Err(ApiError::resource_not_found()),
    };
    let out = output_mode(ctx);
    let ns_str = ns.unwrap_or_default();
    let not_allowed = || {
        ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({})",
            ctx.method
        ))
    };
    let Some(name) = name else {
        return match ctx.method {
            Method::GET | Method::HEAD => {
                if ctx.query.flag("watch") {
                    check_verb(&def, "watch")?;
                    start_watch(shared, ctx, def, ns.map(str::to_string), None, out)
                } else {
                    check_verb(&def, "list")?;
                    let (labels, fields) = selectors(&def, ctx)?;
                    let limit =
                        match ctx.query.get("limit") {
                            None | Some("") => None,
                            Some(l) => Some(l.parse::<usize>().map_err(|_| {
                                ApiError::bad_request(format!("invalid limit {l:?}"))
                            })?),
                        };
                    let page = shared.lock().list(
                        &def,
                        ns,
                        &labels,
                        &fields,
                        limit,
                        ctx.query.get("continue"),
                    )?;
                    Ok(json_response(200, &render_list(&def, page, out)))
                }
            }
            Method::POST => {
                check_verb(&def, "create")?;
                if def.namespaced && ns.is_none() {
                    return Err(not_allowed());
                }
                if def.group == "authentication.k8s.io" && def.plural == "tokenreviews" {
                    return token_review(shared, ctx, &def);
                }
                let body = parse_body(ctx)?;
                let opts = write_opts(ctx)?;
                let created = shared.lock().create(&def, ns_str, body, &opts)?;
                Ok(json_response(201, &render_object(&def, &created, out)))
            }
            Method::DELETE => {
                check_verb(&def, "deletecollection")?;
                if def.namespaced && ns.is_none() {
                    return Err(not_allowed());
                }
                let (labels, fields) = selectors(&def, ctx)?;
                let opts = delete_opts(ctx)?;
                let mut st = shared.lock();
                let names: Vec<String> = st
                    .iter_objects(&def, ns)
                    .filter(|(_, v)| labels.matches(v) && fields.matches(v))
                    .map(|((_, n), _)| n.clone())
                    .collect();
                let mut items = Vec::new();
                for n in names {
                    items.push(present(&def, &st.delete(&def, ns_str, &n, &opts)?));
                }
                let page = ListPage {
                    items,
                    rv: st.rv,
                    cont: None,
                    remaining: None,
                };
                Ok(json_response(200, &render_list(&def, page, out)))
            }
            _ => Err(not_allowed()),
        };
    };
    match ctx.method {
        Method::GET | Method::HEAD => {
            if ctx.query.flag("watch") && sub == Sub::Main {
                check_verb(&def, "watch")?;
                return start_watch(
                    shared,
                    ctx,
                    def,
                    ns.map(str::to_string),
                    Some(name.to_string()),
                    out,
                );
            }
            check_verb(&def, "get")?;
            let st = shared.lock();
            let obj = st
                .get(&def, ns_str, name)
                .ok_or_else(|| ApiError::not_found(&def, name))?;
            Ok(json_response(200, &render_object(&def, obj, out)))
        }
        Method::PUT => {
            check_verb(&def, "update")?;
            let body = parse_body(ctx)?;
            let opts = write_opts(ctx)?;
            let v = shared.lock().update(&def, ns_str, name, body, sub, &opts)?;
            Ok(json_response(200, &render_object(&def, &v, out)))
        }
        Method::PATCH => {
            check_verb(&def, "patch")?;
            let opts = write_opts(ctx)?;
            let ct = ctx.header(header::CONTENT_TYPE).unwrap_or_default();
            let (code, v) = shared
                .lock()
                .patch(&def, ns_str, name, ct, &ctx.body, sub, &opts)?;
            Ok(json_response(code, &render_object(&def, &v, out)))
        }
        Method::DELETE if sub == Sub::Main => {
            check_verb(&def, "delete")?;
            let opts = delete_opts(ctx)?;
            let v = shared.lock().delete(&def, ns_str, name, &opts)?;
            Ok(json_response(200, &render_object(&def, &v, out)))
        }
        _ => Err(not_allowed()),
    }
}

fn token_review(
    shared: &Arc<Shared>,
    ctx: &Ctx,
    def: &ResourceDef,
) -> Result<Response<Body>, ApiError> {
    let mut body = parse_body(ctx)?;
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request was not a JSON object",
        ));
    }
    if body.get("kind").and_then(Value::as_str) != Some("TokenReview") {
        return Err(ApiError::bad_request(format!(
            "the kind of the object ({}) does not match the expected kind (TokenReview)",
            body.get("kind").and_then(Value::as_str).unwrap_or_default()
        )));
    }
    let token = body
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if token.is_empty() {
        return Err(ApiError::bad_request(
            "token is required for TokenReview in authentication",
        ));
    }
    let audiences: Vec<String> = body
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let hook = shared
        .token_review
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let answer = hook(&TokenReviewRequest { token, audiences });
    let mut status = json!({"user": {}});
    if answer.authenticated {
        status["authenticated"] = json!(true);
        let mut user = json!({"username": answer.username});
        if !answer.uid.is_empty() {
            user["uid"] = json!(answer.uid);
        }
        if !answer.groups.is_empty() {
            user["groups"] = json!(answer.groups);
        }
        if !answer.extra.is_empty() {
            user["extra"] = json!(answer.extra);
        }
        status["user"] = user;
    }
    if !answer.audiences.is_empty() {
        status["audiences"] = json!(answer.audiences);
    }
    if let Some(e) = answer.error.filter(|e| !e.is_empty()) {
        status["error"] = json!(e);
    }
    body["apiVersion"] = json!(def.api_version());
    body["status"] = status;
    if !body.get("metadata").is_some_and(Value::is_object) {
        body["metadata"] = json!({});
    }
    body["metadata"]["creationTimestamp"] = Value::Null;
    Ok(json_response(201, &body))
}

/// What one watch stream selects and how it renders.
struct WatchSpec {
    def: ResourceDef,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    out: Output,
}

impl WatchSpec {
    fn matches(&self, obj: &Value) -> bool {
        let ns_ok = self
            .ns
            .as_deref()
            .is_none_or(|n| obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(n));
        ns_ok && self.labels.matches(obj) && self.fields.matches(obj)
    }

    fn line(&self, kind: &str, obj: &Value) -> Bytes {
        let o = render_object(&self.def, obj, self.out);
        let mut s = json!({"type": kind, "object": o}).to_string();
        s.push('\n');
        Bytes::from(s)
    }

    fn render(&self, e: &Event) -> Option<Bytes> {
        if e.res != res_key(&self.def) {
            return None;
        }
        let now = self.matches(&e.object);
        let kind = match e.kind {
            EventKind::Added => now.then_some("ADDED"),
            EventKind::Deleted => now.then_some("DELETED"),
            EventKind::Modified => {
                let before = e.old.as_ref().is_some_and(|o| self.matches(o));
                match (before, now) {
                    (true, true) => Some("MODIFIED"),
                    (false, true) => Some("ADDED"),
                    (true, false) => Some("DELETED"),
                    (false, false) => None,
                }
            }
        }?;
        Some(self.line(kind, &e.object))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let (api_version, kind) = match self.out {
            Output::Metadata => (
                "meta.k8s.io/v1".to_string(),
                "PartialObjectMetadata".to_string(),
            ),
            _ => (self.def.api_version(), self.def.kind.clone()),
        };
        let mut md = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
        if initial_end {
            md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let mut s = json!({
            "type": "BOOKMARK",
            "object": {"kind": kind, "apiVersion": api_version, "metadata": md},
        })
        .to_string();
        s.push('\n');
        Bytes::from(s)
    }
}

fn expired_line(message: String) -> Bytes {
    let mut s =
        json!({"type": "ERROR", "object": ApiError::expired(message).to_status()}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn start_watch(
    shared: &Arc<Shared>,
    ctx: &Ctx,
    def: ResourceDef,
    ns: Option<String>,
    name: Option<String>,
    out: Output,
) -> Result<Response<Body>, ApiError> {
    let (labels, mut fields) = selectors(&def, ctx)?;
    if let Some(n) = name {
        let extra = FieldSelector::parse(&format!("metadata.name={n}"), &[])
            .map_err(ApiError::bad_request)?;
        fields = FieldSelector::merge(fields, extra);
    }
    let from_rv = match ctx.query.get("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?,
        ),
    };
    let send_initial = ctx.query.flag("sendInitialEvents");
    let bookmarks = ctx.query.flag("allowWatchBookmarks");
    // Like the real server: absent or 0 means the server's default.
    let timeout = match ctx.query.get("timeoutSeconds") {
        None | Some("") => DEFAULT_WATCH_TIMEOUT,
        Some(t) => match t.parse::<u64>() {
            Ok(0) => DEFAULT_WATCH_TIMEOUT,
            Ok(secs) => Duration::from_secs(secs.min(DEFAULT_WATCH_TIMEOUT.as_secs())),
            Err(_) => {
                return Err(ApiError::bad_request(format!(
                    "invalid timeoutSeconds {t:?}"
                )));
            }
        },
    };
    let spec = WatchSpec {
        def,
        ns,
        labels,
        fields,
        out,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut initial = Vec::new();
    let (events, start_rv, expired) = {
        let st = shared.lock();
        let events = st.events_tx.subscribe();
        let mut expired = false;
        match from_rv {
            Some(rv) if rv < st.floor => {
                expired = true;
                initial.push(expired_line(format!(
                    "too old resource version: {rv} ({})",
                    st.floor
                )));
            }
            Some(rv) if !send_initial => {
                initial.extend(
                    st.history
                        .iter()
                        .filter(|e| e.rv > rv)
                        .filter_map(|e| spec.render(e)),
                );
            }
            _ => {
                initial.extend(
                    st.iter_objects(&spec.def, spec.ns.as_deref())
                        .filter(|(_, v)| spec.matches(v))
                        .map(|(_, v)| spec.line("ADDED", v)),
                );
                if send_initial {
                    initial.push(spec.bookmark(st.rv, true));
                }
            }
        }
        (events, st.rv, expired)
    };
    let drop_rx = shared.drop_tx.subscribe();
    let shutdown_rx = shared.shutdown_tx.subscribe();
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let guard = WatchGuard(shared.clone());
    tokio::spawn(async move {
        let _guard = guard;
        if expired {
            for line in initial {
                let _ = tx.send(line).await;
            }
            return;
        }
        run_watch(
            spec,
            tx,
            events,
            initial,
            start_rv,
            bookmarks,
            timeout,
            drop_rx,
            shutdown_rx,
        )
        .await;
    });
    let mut r = Response::new(Body::Stream(rx));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache, private"),
    );
    Ok(r)
}

struct WatchGuard(Arc<Shared>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_watch(
    spec: WatchSpec,
    tx: mpsc::Sender<Bytes>,
    mut events: broadcast::Receiver<Arc<Event>>,
    initial: Vec<Bytes>,
    mut last_rv: u64,
    bookmarks: bool,
    timeout: Duration,
    mut drop_rx: watch::Receiver<u64>,
    mut shutdown_rx: watch::Receiver<bool>,
) {
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    for line in initial {
        tokio::select! {
            r = tx.send(line) => if r.is_err() { return },
            _ = drop_rx.changed() => return,
            _ = shutdown_rx.changed() => return,
            _ = &mut deadline => return,
        }
    }
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + BOOKMARK_INTERVAL,
        BOOKMARK_INTERVAL,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let line = tokio::select! {
            _ = tx.closed() => return,
            _ = drop_rx.changed() => return,
            _ = shutdown_rx.changed() => return,
            _ = &mut deadline => return,
            _ = tick.tick(), if bookmarks => Some(spec.bookmark(last_rv, false)),
            r = events.recv() => match r {
                Ok(e) => {
                    last_rv = last_rv.max(e.rv);
                    spec.render(&e)
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = tx
                        .send(expired_line(format!(
                            "too old resource version: {last_rv}: the watch fell behind"
                        )))
                        .await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if let Some(line) = line {
            tokio::select! {
                r = tx.send(line) => if r.is_err() { return },
                _ = drop_rx.changed() => return,
                _ = shutdown_rx.changed() => return,
                _ = &mut deadline => return,
            }
        }
    }
}
