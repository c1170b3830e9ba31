//! A small client of the workload API: one connection, one request at a
//! time (what `keymint run` needs, and the tests).

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::protocol::ApiError;

/// Talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the keymint agent at `{path}`")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the connection to the keymint agent failed")]
    Io(#[from] std::io::Error),
    #[error("the keymint agent closed the connection")]
    Closed,
    #[error("unexpected answer from the keymint agent")]
    Decode,
    #[error("the keymint agent refused: {0}")]
    Api(ApiError),
}

#[derive(Debug)]
pub struct AgentClient {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl AgentClient {
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, write) = s.into_split();
        Ok(Self {
            read: BufReader::new(read),
            write,
        })
    }

    /// Sends `{"op": op, ...fields}` and reads the answer (skipping event
    /// lines): the response's fields, or its error.
    pub async fn call<T: DeserializeOwned>(
        &mut self,
        op: &str,
        fields: &impl Serialize,
    ) -> Result<T, ClientError> {
        let mut req = match serde_json::to_value(fields).map_err(|_| ClientError::Decode)? {
            Value::Object(o) => o,
            Value::Null => serde_json::Map::new(),
            _ => return Err(ClientError::Decode),
        };
        req.insert("op".into(), Value::String(op.to_owned()));
        let mut line = serde_json::to_vec(&req).map_err(|_| ClientError::Decode)?;
        line.push(b'\n');
        self.write.write_all(&line).await?;
        loop {
            let v = self.next().await?;
            if v.get("event").is_some() {
                continue;
            }
            return if v.get("ok") == Some(&Value::Bool(true)) {
                serde_json::from_value(v).map_err(|_| ClientError::Decode)
            } else {
                let e: ApiError =
                    serde_json::from_value(v["error"].clone()).map_err(|_| ClientError::Decode)?;
                Err(ClientError::Api(e))
            };
        }
    }

    /// The next line (a response or an event) as JSON.
    pub async fn next(&mut self) -> Result<Value, ClientError> {
        let mut buf = String::new();
        if self.read.read_line(&mut buf).await? == 0 {
            return Err(ClientError::Closed);
        }
        serde_json::from_str(&buf).map_err(|_| ClientError::Decode)
    }
}
