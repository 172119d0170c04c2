//! OpenAI's Files and Batch APIs, as far as an embeddings batch uses them:
//! `POST /v1/files` (multipart, purpose `batch`), `GET /v1/files/{id}`,
//! `GET /v1/files/{id}/content`, `POST /v1/batches`, `GET /v1/batches/{id}`
//! and `POST /v1/batches/{id}/cancel`.
//!
//! A batch moves `validating` → `in_progress` → `finalizing` → `completed`
//! one step per `GET` (unless batches are held), or straight to its end
//! with [`crate::FakeVendor::finish_batches`]. Its input is validated as
//! OpenAI validates it (a bad file fails the batch with `errors`), each
//! line is answered by the embeddings endpoint's own code, and the lines
//! that fail go to the error file. A queued [`BatchFate`] makes the next
//! batch expire, fail or be cancelled instead.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::RecordedRequest;
use crate::embeddings::answer_batch_line;
use crate::error::{ApiError, check_auth, json_headers};
use crate::{InputItem, Shared, lock};

/// Requests one batch may hold (OpenAI's limit).
pub const MAX_BATCH_REQUESTS: usize = 50_000;
/// Largest input file accepted.
pub const MAX_FILE_BYTES: usize = 200 * 1024 * 1024;

const ENDPOINTS: &[&str] = &["/v1/embeddings", "/v1/chat/completions", "/v1/responses"];

/// How the next batch created ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BatchFate {
    /// Every line is answered (those asked to fail go to the error file).
    #[default]
    Complete,
    /// The completion window passes: no line is answered, each one is in
    /// the error file as `batch_expired`.
    Expire,
    /// The batch fails as a whole (status `failed`, `errors` set).
    Fail,
    /// The batch is cancelled before any line is answered.
    Cancel,
}

/// One line of a batch's input file, as received.
#[derive(Clone, Debug)]
pub struct BatchLine {
    pub batch_id: String,
    pub custom_id: String,
    /// Its `/v1/embeddings` body (`authorization` is the batch's: none here).
    pub request: RecordedRequest,
}

#[derive(Clone)]
struct StoredFile {
    filename: String,
    purpose: String,
    bytes: Arc<Vec<u8>>,
    created_at: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Status {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }

    fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Failed | Status::Expired | Status::Cancelled
        )
    }
}

struct Batch {
    id: String,
    input_file_id: String,
    endpoint: String,
    created_at: u64,
    status: Status,
    fate: BatchFate,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    errors: Option<Value>,
    /// Output and error files written while finalizing.
    staged: Option<(Option<String>, Option<String>)>,
    total: usize,
    completed: usize,
    failed: usize,
}

/// Files, batches, and what tests asked of them.
#[derive(Default)]
pub(crate) struct Batches {
    files: HashMap<String, StoredFile>,
    batches: HashMap<String, Batch>,
    /// In creation order.
    order: Vec<String>,
    next_id: u64,
    fates: VecDeque<BatchFate>,
    /// Inputs whose batch lines fail (500) wherever they appear.
    failing: HashSet<InputItem>,
    /// Statuses the next `POST /v1/batches` answer with instead (FIFO).
    create_errors: VecDeque<u16>,
    /// While set, no batch moves on by itself.
    held: bool,
    lines: Vec<BatchLine>,
}

impl Batches {
    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        let hash = blake3::hash(&self.next_id.to_le_bytes()).to_hex();
        format!("{prefix}{}", &hash.as_str()[..24])
    }

    pub(crate) fn push_fate(&mut self, fate: BatchFate) {
        self.fates.push_back(fate);
    }

    pub(crate) fn fail_input(&mut self, input: InputItem) {
        self.failing.insert(input);
    }

    pub(crate) fn push_create_error(&mut self, status: u16) {
        self.create_errors.push_back(status);
    }

    pub(crate) fn hold(&mut self, held: bool) {
        self.held = held;
    }

    pub(crate) fn lines(&self) -> Vec<BatchLine> {
        self.lines.clone()
    }

    pub(crate) fn ids(&self) -> Vec<String> {
        self.order.clone()
    }

    pub(crate) fn status(&self, id: &str) -> Option<&'static str> {
        self.batches.get(id).map(|b| b.status.as_str())
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("No such {what}: '{id}'"),
    )
}

fn file_object(id: &str, f: &StoredFile) -> Value {
    json!({
        "id": id,
        "object": "file",
        "bytes": f.bytes.len(),
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
    })
}

fn batch_object(b: &Batch) -> Value {
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": b.errors,
        "input_file_id": b.input_file_id,
        "completion_window": "24h",
        "status": b.status.as_str(),
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": null,
    })
}

fn json(status: StatusCode, value: &Value) -> Response {
    (status, json_headers(), value.to_string()).into_response()
}

/// `POST /v1/files`: multipart with `purpose` and `file`.
pub(crate) async fn upload(State(shared): State<Arc<Shared>>, mut form: Multipart) -> Response {
    let mut purpose = None;
    let mut file = None;
    loop {
        let field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                return ApiError::invalid(format!("Invalid multipart body: {e}")).into_response();
            }
        };
        match field.name() {
            Some("purpose") => purpose = field.text().await.ok(),
            Some("file") => {
                let name = field.file_name().unwrap_or("upload").to_owned();
                match field.bytes().await {
                    Ok(bytes) => file = Some((name, bytes)),
                    Err(e) => {
                        return ApiError::invalid(format!("Invalid file: {e}")).into_response();
                    }
                }
            }
            _ => {}
        }
    }
    let Some(purpose) = purpose else {
        return ApiError::invalid("'purpose' is a required property")
            .param("purpose")
            .into_response();
    };
    let Some((filename, bytes)) = file else {
        return ApiError::invalid("'file' is a required property")
            .param("file")
            .into_response();
    };
    if purpose != "batch" && purpose != "fine-tune" && purpose != "assistants" {
        return ApiError::invalid(format!("'{purpose}' is not one of the supported purposes"))
            .param("purpose")
            .into_response();
    }
    let stored = StoredFile {
        filename,
        purpose,
        bytes: Arc::new(bytes.to_vec()),
        created_at: now(),
    };
    let mut state = lock(&shared.batches);
    let id = state.id("file-");
    let body = file_object(&id, &stored);
    state.files.insert(id, stored);
    json(StatusCode::OK, &body)
}

/// `GET /v1/files/{id}`.
pub(crate) async fn file(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let state = lock(&shared.batches);
    match state.files.get(&id) {
        Some(f) => json(StatusCode::OK, &file_object(&id, f)),
        None => not_found("file", &id).into_response(),
    }
}

/// `GET /v1/files/{id}/content`.
pub(crate) async fn content(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let bytes = lock(&shared.batches)
        .files
        .get(&id)
        .map(|f| Arc::clone(&f.bytes));
    match bytes {
        Some(bytes) => (StatusCode::OK, bytes.as_ref().clone()).into_response(),
        None => not_found("file", &id).into_response(),
    }
}

/// `POST /v1/batches`.
pub(crate) async fn create(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(&body) else {
        return ApiError::bad_json().into_response();
    };
    let field = |name: &str| req.get(name).and_then(Value::as_str);
    let Some(input_file_id) = field("input_file_id") else {
        return ApiError::invalid("'input_file_id' is a required property")
            .param("input_file_id")
            .into_response();
    };
    let endpoint = field("endpoint").unwrap_or_default();
    if !ENDPOINTS.contains(&endpoint) {
        return ApiError::invalid(format!(
            "'{endpoint}' is not one of {ENDPOINTS:?} - 'endpoint'"
        ))
        .param("endpoint")
        .into_response();
    }
    if field("completion_window") != Some("24h") {
        return ApiError::invalid("'completion_window' must be '24h'")
            .param("completion_window")
            .into_response();
    }
    let mut state = lock(&shared.batches);
    if let Some(status) = state.create_errors.pop_front() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return ApiError::for_status(status, None).into_response();
    }
    match state.files.get(input_file_id) {
        Some(f) if f.purpose == "batch" => {}
        Some(_) => {
            return ApiError::invalid("The input file must have purpose 'batch'")
                .param("input_file_id")
                .into_response();
        }
        None => return not_found("file", input_file_id).into_response(),
    }
    let fate = state.fates.pop_front().unwrap_or_default();
    let id = state.id("batch_");
    let batch = Batch {
        id: id.clone(),
        input_file_id: input_file_id.to_owned(),
        endpoint: endpoint.to_owned(),
        created_at: now(),
        status: Status::Validating,
        fate,
        output_file_id: None,
        error_file_id: None,
        errors: None,
        staged: None,
        total: 0,
        completed: 0,
        failed: 0,
    };
    let body = batch_object(&batch);
    state.order.push(id.clone());
    state.batches.insert(id, batch);
    json(StatusCode::OK, &body)
}

/// `GET /v1/batches/{id}`: the batch moves one step on (unless held).
pub(crate) async fn retrieve(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Response {
    let held = lock(&shared.batches).held;
    if !held {
        step(&shared, &id);
    }
    let state = lock(&shared.batches);
    match state.batches.get(&id) {
        Some(b) => json(StatusCode::OK, &batch_object(b)),
        None => not_found("batch", &id).into_response(),
    }
}

/// `POST /v1/batches/{id}/cancel`.
pub(crate) async fn cancel(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    {
        let mut state = lock(&shared.batches);
        match state.batches.get_mut(&id) {
            None => return not_found("batch", &id).into_response(),
            Some(b) if b.status.is_terminal() => {
                let message = format!("Cannot cancel a batch with status '{}'.", b.status.as_str());
                return ApiError::new(StatusCode::CONFLICT, "invalid_request_error", message)
                    .into_response();
            }
            Some(b) => {
                b.fate = BatchFate::Cancel;
                b.status = Status::Cancelling;
            }
        }
    }
    let state = lock(&shared.batches);
    match state.batches.get(&id) {
        Some(b) => json(StatusCode::OK, &batch_object(b)),
        None => not_found("batch", &id).into_response(),
    }
}

/// Moves every batch that has not ended to its end.
pub(crate) fn finish_all(shared: &Shared) {
    let ids = lock(&shared.batches).ids();
    for id in ids {
        // At most three steps lead from `validating` to any end; an ended
        // batch does not move.
        for _ in 0..3 {
            step(shared, &id);
        }
    }
}

/// One step of a batch's life.
fn step(shared: &Shared, id: &str) {
    let mut state = lock(&shared.batches);
    let Some((status, fate, file_id, endpoint)) = state.batches.get(id).map(|b| {
        (
            b.status,
            b.fate,
            b.input_file_id.clone(),
            b.endpoint.clone(),
        )
    }) else {
        return;
    };
    let end = match (status, fate) {
        (Status::Validating, _) => {
            let checked = match state.files.get(&file_id) {
                Some(f) => validate(&f.bytes, &endpoint),
                None => Err(json!({"code": "invalid_file", "message": "The input file is gone."})),
            };
            let Some(batch) = state.batches.get_mut(id) else {
                return;
            };
            match checked {
                Ok(_) if fate == BatchFate::Fail => {
                    batch.status = Status::Failed;
                    batch.errors = Some(json!({"object": "list", "data": [{
                        "code": "token_limit_exceeded",
                        "message": "Enqueued token limit reached. Please try again later.",
                        "param": null, "line": null}]}));
                }
                Ok(lines) => {
                    batch.total = lines.len();
                    batch.status = Status::InProgress;
                }
                Err(error) => {
                    batch.status = Status::Failed;
                    batch.errors = Some(json!({"object": "list", "data": [error]}));
                }
            }
            return;
        }
        (Status::InProgress, BatchFate::Complete) => Status::Finalizing,
        (Status::InProgress, BatchFate::Expire) => Status::Expired,
        (Status::InProgress | Status::Cancelling, _) if fate == BatchFate::Cancel => {
            Status::Cancelled
        }
        (Status::Finalizing, _) => {
            if let Some(batch) = state.batches.get_mut(id) {
                let (output, errors) = batch.staged.take().unwrap_or_default();
                batch.output_file_id = output;
                batch.error_file_id = errors;
                batch.status = Status::Completed;
            }
            return;
        }
        _ => return,
    };
    drop(state);
    run(shared, id, end);
}

/// The lines of an input file, checked as OpenAI checks them: JSON, a
/// unique `custom_id`, `POST` to the batch's endpoint, one model throughout.
fn validate(bytes: &[u8], endpoint: &str) -> Result<Vec<(String, Value)>, Value> {
    let error = |line: usize, code: &str, message: String| json!({"code": code, "message": message, "param": null, "line": line});
    let text = std::str::from_utf8(bytes)
        .map_err(|_| error(1, "invalid_json_line", "The file is not UTF-8.".into()))?;
    let mut lines = Vec::new();
    let mut ids = HashSet::new();
    let mut model: Option<String> = None;
    for (n, raw) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let line = n + 1;
        let Ok(Value::Object(v)) = serde_json::from_str::<Value>(raw) else {
            return Err(error(
                line,
                "invalid_json_line",
                format!("Line {line} is not valid JSON."),
            ));
        };
        let Some(custom_id) = v.get("custom_id").and_then(Value::as_str) else {
            return Err(error(
                line,
                "missing_custom_id",
                "custom_id is required.".into(),
            ));
        };
        if !ids.insert(custom_id.to_owned()) {
            return Err(error(
                line,
                "duplicate_custom_id",
                format!("The custom_id '{custom_id}' appears more than once."),
            ));
        }
        if v.get("method").and_then(Value::as_str) != Some("POST") {
            return Err(error(
                line,
                "invalid_method",
                "Only POST is supported.".into(),
            ));
        }
        if v.get("url").and_then(Value::as_str) != Some(endpoint) {
            return Err(error(
                line,
                "mismatched_url",
                format!("The url must match the batch's endpoint '{endpoint}'."),
            ));
        }
        let body = v.get("body").cloned().unwrap_or(Value::Null);
        let line_model = body.get("model").and_then(Value::as_str).map(str::to_owned);
        match (&model, &line_model) {
            (_, None) => {
                return Err(error(
                    line,
                    "missing_model",
                    "The body must name a model.".into(),
                ));
            }
            (Some(m), Some(l)) if m != l => {
                return Err(error(
                    line,
                    "mismatched_model",
                    "Every line must use the same model.".into(),
                ));
            }
            _ => model = line_model,
        }
        lines.push((custom_id.to_owned(), body));
    }
    if lines.is_empty() {
        return Err(error(
            1,
            "empty_file",
            "The input file holds no requests.".into(),
        ));
    }
    if lines.len() > MAX_BATCH_REQUESTS {
        return Err(error(
            1,
            "too_many_requests",
            format!("A batch holds at most {MAX_BATCH_REQUESTS} requests."),
        ));
    }
    Ok(lines)
}

/// Ends a batch as `end` (or finalizes it): answers its lines (all of them
/// when finalizing, none when expired or cancelled), writes the output and
/// error files.
fn run(shared: &Shared, id: &str, end: Status) {
    let (bytes, endpoint) = {
        let state = lock(&shared.batches);
        let Some(batch) = state.batches.get(id) else {
            return;
        };
        let bytes = state
            .files
            .get(&batch.input_file_id)
            .map(|f| Arc::clone(&f.bytes));
        (bytes, batch.endpoint.clone())
    };
    let lines = bytes
        .and_then(|b| validate(&b, &endpoint).ok())
        .unwrap_or_default();
    let failing = lock(&shared.batches).failing.clone();
    let mut output = String::new();
    let mut errors = String::new();
    let mut recorded = Vec::new();
    let (mut completed, mut failed) = (0, 0);
    for (n, (custom_id, body)) in lines.iter().enumerate() {
        let record = record_line(id, custom_id, body);
        let line_id = format!(
            "batch_req_{}",
            &blake3::hash(format!("{id}/{n}").as_bytes()).to_hex()[..24]
        );
        let fails = record.request.inputs.iter().any(|i| failing.contains(i));
        recorded.push(record);
        let out = if end != Status::Finalizing {
            let code = if end == Status::Expired {
                "batch_expired"
            } else {
                "batch_cancelled"
            };
            let message = if end == Status::Expired {
                "This request could not be executed before the completion window expired."
            } else {
                "This request was not executed because the batch was cancelled."
            };
            failed += 1;
            errors.push_str(
                &json!({"id": line_id, "custom_id": custom_id, "response": null,
                "error": {"code": code, "message": message}})
                .to_string(),
            );
            errors.push('\n');
            continue;
        } else if fails {
            let e = ApiError::for_status(StatusCode::INTERNAL_SERVER_ERROR, None);
            (e.status, e.body())
        } else {
            answer_batch_line(shared, body)
        };
        let (status, body) = out;
        let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let request_id = format!("req_{}", &blake3::hash(line_id.as_bytes()).to_hex()[..32]);
        let line = json!({"id": line_id, "custom_id": custom_id,
            "response": {"status_code": status.as_u16(), "request_id": request_id, "body": body},
            "error": null});
        if status.is_success() {
            completed += 1;
            output.push_str(&line.to_string());
            output.push('\n');
        } else {
            failed += 1;
            errors.push_str(&line.to_string());
            errors.push('\n');
        }
    }
    let mut state = lock(&shared.batches);
    state.lines.extend(recorded);
    let file = |state: &mut Batches, text: String, name: &str| {
        (!text.is_empty()).then(|| {
            let id = state.id("file-");
            state.files.insert(
                id.clone(),
                StoredFile {
                    filename: name.to_owned(),
                    purpose: "batch_output".to_owned(),
                    bytes: Arc::new(text.into_bytes()),
                    created_at: now(),
                },
            );
            id
        })
    };
    let output_id = file(&mut state, output, "batch_output.jsonl");
    let error_id = file(&mut state, errors, "batch_errors.jsonl");
    if let Some(batch) = state.batches.get_mut(id) {
        batch.status = end;
        // Counts show while finalizing; the files only once completed.
        match end {
            Status::Finalizing => batch.staged = Some((output_id, error_id)),
            _ => (batch.output_file_id, batch.error_file_id) = (output_id, error_id),
        }
        batch.total = lines.len();
        batch.completed = completed;
        batch.failed = failed;
    }
}

fn record_line(batch_id: &str, custom_id: &str, body: &Value) -> BatchLine {
    BatchLine {
        batch_id: batch_id.to_owned(),
        custom_id: custom_id.to_owned(),
        request: crate::embeddings::lenient_record(Some(body), &HeaderMap::new()),
    }
}

/// Azure OpenAI's: an `api-key` header, and an `api-version` on every call.
pub(crate) async fn require_azure_key(
    State(shared): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let versioned = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|p| p.starts_with("api-version=") && p.len() > 12)
    });
    if !versioned {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "Resource not found: the api-version query parameter is required.",
        )
        .into_response();
    }
    let key = req
        .headers()
        .get("api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or_default();
    let accepted = !key.is_empty()
        && shared
            .valid_keys()
            .is_none_or(|keys| keys.iter().any(|k| k == key));
    match accepted {
        true => next.run(req).await,
        false => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Access denied due to invalid subscription key or wrong API endpoint.",
        )
        .code("401")
        .into_response(),
    }
}

/// The Files and Batch APIs take the same key as every other route.
pub(crate) async fn require_key(
    State(shared): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match check_auth(req.headers(), shared.valid_keys()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}
