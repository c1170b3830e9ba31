//! Generates the benchmark corpus: realistic text files (source code,
//! configs, CI logs, JSON lockfiles, docs) full of decoys (placeholders,
//! documentation examples, hashes, UUIDs, base64) with keys of every
//! supported format planted among them. The keys are random, made at
//! generation time; `planted.jsonl` lists each one (file, line, rule).
//!
//! ```sh
//! cargo run --release -p keymint-scan --example gen_corpus -- OUT_DIR [SIZE_MB] [SEED]
//! cargo run --release -p keymint-scan --example gen_corpus -- --keys N SEED
//! ```
//!
//! `--keys` only prints N planted lines, one of each kind in turn, as JSON
//! lines (`rule`, `line`, `secret`) on standard output, for benchmarks that
//! plant keys elsewhere (`bench/compare-git.sh`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chars(&mut self, n: usize, alphabet: &[u8]) -> String {
        (0..n)
            .map(|_| char::from(alphabet[self.below(alphabet.len())]))
            .collect()
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const URL: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_";
const HEX: &[u8] = b"0123456789abcdef";
const B64: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+/";
const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const B32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const UPPER_NUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const DIGITS: &[u8] = b"0123456789";

fn base62_checksum(data: &[u8]) -> String {
    let mut v = crc32fast::hash(data);
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = B62[(v % 62) as usize];
        v /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A value of `n` letters and digits after a digit: one that the name
/// rules' floors (a digit, 3.5 bits a byte) take.
fn digit_led(r: &mut Rng, n: usize) -> String {
    let digit = r.below(10);
    format!("{digit}{}", r.chars(n, B62))
}

/// A log line's time to the second, minutes then seconds drawn (the
/// planted log lines' stamp).
fn log_time(r: &mut Rng) -> String {
    let minute = r.below(60);
    format!("2026-11-30T10:{minute:02}:{:02}", r.below(60))
}

/// `user:password` in base64, as a Basic header and Docker's `auth` hold it.
fn basic(user_password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(user_password)
}

fn github(r: &mut Rng, prefix: &str) -> String {
    let body = r.chars(30, B62);
    let sum = base62_checksum(body.as_bytes());
    format!("{prefix}{body}{sum}")
}

/// (rule id, line to plant) for one random key of each kind.
fn planted_line(r: &mut Rng, kind: usize) -> (&'static str, String, String) {
    let (rule, var, secret): (&str, &str, String) = match kind {
        0 => (
            "openai.legacy-key",
            "OPENAI_API_KEY",
            format!("sk-{}T3BlbkFJ{}", r.chars(20, B62), r.chars(20, B62)),
        ),
        1 => (
            "openai.project-key",
            "OPENAI_API_KEY",
            format!("sk-proj-{}T3BlbkFJ{}", r.chars(74, URL), r.chars(74, URL)),
        ),
        2 => (
            "openai.service-account-key",
            "OPENAI_API_KEY",
            format!(
                "sk-svcacct-{}T3BlbkFJ{}",
                r.chars(58, URL),
                r.chars(58, URL)
            ),
        ),
        3 => (
            "openai.admin-key",
            "OPENAI_ADMIN_KEY",
            format!("sk-admin-{}T3BlbkFJ{}", r.chars(58, URL), r.chars(58, URL)),
        ),
        4 => (
            "anthropic.api-key",
            "ANTHROPIC_API_KEY",
            format!("sk-ant-api03-{}AA", r.chars(93, URL)),
        ),
        5 => (
            "anthropic.admin-key",
            "ANTHROPIC_ADMIN_KEY",
            format!("sk-ant-admin01-{}AA", r.chars(93, URL)),
        ),
        6 => (
            "google.api-key",
            "GEMINI_API_KEY",
            format!("AIzaSy{}", r.chars(33, URL)),
        ),
        7 => ("azure.openai-key", "AZURE_OPENAI_API_KEY", r.chars(32, HEX)),
        8 => (
            "huggingface.token",
            "HF_TOKEN",
            format!("hf_{}", r.chars(34, LETTERS)),
        ),
        9 => ("cohere.api-key", "COHERE_API_KEY", r.chars(40, B62)),
        10 => ("mistral.api-key", "MISTRAL_API_KEY", r.chars(32, B62)),
        11 => (
            "groq.api-key",
            "GROQ_API_KEY",
            format!("gsk_{}", r.chars(52, B62)),
        ),
        12 => (
            "replicate.api-token",
            "REPLICATE_API_TOKEN",
            format!("r8_{}", r.chars(37, B62)),
        ),
        13 => (
            "together.api-key",
            "TOGETHER_API_KEY",
            format!("tgp_v1_{}", r.chars(43, URL)),
        ),
        14 => (
            "perplexity.api-key",
            "PERPLEXITY_API_KEY",
            format!("pplx-{}", r.chars(48, B62)),
        ),
        15 => (
            "xai.api-key",
            "XAI_API_KEY",
            format!("xai-{}", r.chars(80, B62)),
        ),
        16 => (
            "deepseek.api-key",
            "DEEPSEEK_API_KEY",
            format!("sk-{}", r.chars(32, HEX)),
        ),
        17 => (
            "openrouter.api-key",
            "OPENROUTER_API_KEY",
            format!("sk-or-v1-{}", r.chars(64, HEX)),
        ),
        18 => (
            "fireworks.api-key",
            "FIREWORKS_API_KEY",
            format!("fw_{}", r.chars(24, B62)),
        ),
        19 => (
            "langsmith.api-key",
            "LANGSMITH_API_KEY",
            format!("lsv2_pt_{}_{}", r.chars(32, HEX), r.chars(10, HEX)),
        ),
        20 => (
            "pinecone.api-key",
            "PINECONE_API_KEY",
            format!("pcsk_{}_{}", r.chars(6, B62), r.chars(63, B62)),
        ),
        21 => (
            "aws.access-key-id",
            "AWS_ACCESS_KEY_ID",
            format!("AKIA{}", r.chars(16, B32)),
        ),
        22 => (
            "aws.secret-access-key",
            "aws_secret_access_key",
            r.chars(40, B64),
        ),
        23 => ("github.token", "GITHUB_TOKEN", github(r, "ghp_")),
        24 => (
            "github.fine-grained-pat",
            "GH_TOKEN",
            format!("github_pat_{}_{}", r.chars(22, B62), r.chars(59, B62)),
        ),
        25 => (
            "gitlab.personal-access-token",
            "GITLAB_TOKEN",
            format!("glpat-{}", r.chars(20, URL)),
        ),
        26 => (
            "slack.bot-token",
            "SLACK_BOT_TOKEN",
            format!(
                "xoxb-{}-{}-{}",
                r.chars(11, DIGITS),
                r.chars(13, DIGITS),
                r.chars(24, B62)
            ),
        ),
        27 => (
            "slack.webhook",
            "SLACK_WEBHOOK_URL",
            format!(
                "https://hooks.slack.com/services/T{}/B{}/{}",
                r.chars(10, UPPER_NUM),
                r.chars(10, UPPER_NUM),
                r.chars(24, B62)
            ),
        ),
        28 => (
            "stripe.live-key",
            "STRIPE_SECRET_KEY",
            format!("sk_live_{}", r.chars(99, B62)),
        ),
        29 => ("npm.access-token", "NPM_TOKEN", github(r, "npm_")),
        30 => ("keymint.token", "OPENAI_API_KEY", {
            let body = r.chars(43, B62);
            let sum = base62_checksum(format!("kmt_{body}").as_bytes());
            format!("kmt_{body}{sum}")
        }),
        31 => (
            "azure.storage-account-key",
            "AZURE_STORAGE_CONNECTION_STRING",
            {
                format!(
                    "DefaultEndpointsProtocol=https;AccountName=acct{};AccountKey={}==;EndpointSuffix=core.windows.net",
                    r.chars(6, DIGITS),
                    r.chars(86, B64)
                )
            },
        ),
        32 => (
            "azure.ai-services-key",
            "AZURE_OPENAI_API_KEY",
            format!("{}JQQJ99{}", r.chars(52, B62), r.chars(26, B62)),
        ),
        33 => (
            "azure.entra-client-secret",
            "AZURE_CLIENT_SECRET",
            format!("{}8Q~{}", r.chars(3, B62), r.chars(34, B62)),
        ),
        34 => (
            "slack.user-token",
            "SLACK_USER_TOKEN",
            format!(
                "xoxp-{}-{}-{}-{}",
                r.chars(11, DIGITS),
                r.chars(11, DIGITS),
                r.chars(13, DIGITS),
                r.chars(32, HEX)
            ),
        ),
        35 => (
            "slack.app-token",
            "SLACK_APP_TOKEN",
            format!(
                "xapp-1-A{}-{}-{}",
                r.chars(10, UPPER_NUM),
                r.chars(13, DIGITS),
                r.chars(64, HEX)
            ),
        ),
        36 => (
            "huggingface.org-token",
            "HUGGINGFACEHUB_API_TOKEN",
            format!("api_org_{}", r.chars(34, LETTERS)),
        ),
        37 => (
            "together.api-key-legacy",
            "TOGETHER_API_KEY",
            r.chars(64, HEX),
        ),
        38 => (
            "gitlab.token",
            "CI_RUNNER_TOKEN",
            format!("glrt-{}", r.chars(20, URL)),
        ),
        39 => (
            "aws.secret-access-key-csv",
            "",
            format!("deploy-user,AKIA{},{}", r.chars(16, B32), r.chars(40, B64)),
        ),
        40 => ("google.service-account", "", {
            let mut pem = String::from("-----BEGIN PRIVATE KEY-----\\n");
            for _ in 0..5 {
                pem.push_str(&r.chars(64, B64));
                pem.push_str("\\n");
            }
            pem.push_str("-----END PRIVATE KEY-----\\n");
            format!(
                "{{\"type\": \"service_account\", \"project_id\": \"p{}\", \"private_key_id\": \"{}\", \"private_key\": \"{pem}\", \"client_email\": \"ci@p.iam.gserviceaccount.com\"}}",
                r.chars(6, DIGITS),
                r.chars(40, HEX)
            )
        }),
        41 => ("generic.named-secret-json", "", {
            let name = r.pick(&[
                "COHERE_API_KEY",
                "PAYMENTS_SECRET",
                "DB_PASSWORD",
                "INTERNAL_SERVICE_TOKEN",
            ]);
            let v = r.chars(40, B62);
            format!("{{\"name\": \"{name}\", \"value\": \"{v}\"}},")
        }),
        42 => ("generic.named-secret-yaml", "", {
            let name = r.pick(&[
                "COHERE_API_KEY",
                "PAYMENTS_SECRET",
                "DB_PASSWORD",
                "INTERNAL_SERVICE_TOKEN",
            ]);
            let v = r.chars(32, B62);
            format!("        - name: {name}\n          value: \"{v}\"")
        }),
        43 => ("generic.bearer", "", {
            let v = r.chars(40, URL);
            format!(
                "{}Z DEBUG > GET /v1/reports HTTP/1.1 | Authorization: Bearer {v}",
                log_time(r)
            )
        }),
        44 => ("uri.password", "", {
            let scheme = r.pick(&[
                "postgres",
                "postgresql",
                "mysql",
                "redis",
                "amqp",
                "mongodb+srv",
            ]);
            let v = r.chars(24, B62);
            format!(
                "DATABASE_URL={scheme}://app:{v}@db-{}.internal:5432/orders",
                r.below(9)
            )
        }),
        45 => (
            "cerebras.api-key",
            "CEREBRAS_API_KEY",
            format!(
                "csk-{}",
                r.chars(48, b"abcdefghijklmnopqrstuvwxyz0123456789")
            ),
        ),
        46 => (
            "nvidia.api-key",
            "NVIDIA_API_KEY",
            format!("nvapi-{}", r.chars(64, URL)),
        ),
        47 => (
            "wandb.api-key",
            "WANDB_API_KEY",
            format!("wandb_v1_{}", r.chars(77, B62)),
        ),
        48 => (
            "vercel.token",
            "AI_GATEWAY_API_KEY",
            format!("vck_{}", r.chars(56, URL)),
        ),
        49 => (
            "digitalocean.token",
            "DIGITALOCEAN_TOKEN",
            format!("dop_v1_{}", r.chars(64, HEX)),
        ),
        50 => (
            "heroku.api-key",
            "HEROKU_API_KEY",
            format!("HRKU-AA{}", r.chars(58, URL)),
        ),
        51 => (
            "supabase.secret-key",
            "SUPABASE_SECRET_KEY",
            format!("sb_secret_{}", r.chars(31, B62)),
        ),
        52 => (
            "databricks.token",
            "DATABRICKS_TOKEN",
            format!("dapi{}", r.chars(32, HEX)),
        ),
        53 => (
            "doppler.token",
            "DOPPLER_TOKEN",
            format!("dp.st.{}", r.chars(43, B62)),
        ),
        54 => (
            "hashicorp.vault-token",
            "VAULT_TOKEN",
            format!("hvs.{}", r.chars(95, URL)),
        ),
        55 => (
            "hashicorp.terraform-token",
            "TFE_TOKEN",
            format!("{}.atlasv1.{}", r.chars(14, B62), r.chars(67, URL)),
        ),
        56 => (
            "alibaba.access-key-id",
            "ALIBABA_CLOUD_ACCESS_KEY_ID",
            format!("LTAI{}", r.chars(20, B62)),
        ),
        57 => (
            "runpod.api-key",
            "RUNPOD_API_KEY",
            format!("rpa_{}{}", r.chars(40, UPPER_NUM), r.chars(6, B62)),
        ),
        58 => (
            "flyio.token",
            "FLY_API_TOKEN",
            format!("fo1_{}", r.chars(43, URL)),
        ),
        59 => (
            "pypi.upload-token",
            "TWINE_PASSWORD",
            format!("pypi-AgEIcHlwaS5vcmc{}", r.chars(70, URL)),
        ),
        60 => (
            "dockerhub.token",
            "DOCKERHUB_TOKEN",
            format!("dckr_pat_{}", r.chars(27, URL)),
        ),
        61 => (
            "sendgrid.api-key",
            "SENDGRID_API_KEY",
            format!("SG.{}.{}", r.chars(22, URL), r.chars(43, URL)),
        ),
        62 => (
            "postman.api-key",
            "POSTMAN_API_KEY",
            format!("PMAK-{}-{}", r.chars(24, HEX), r.chars(34, HEX)),
        ),
        63 => (
            "aws.bedrock-api-key",
            "AWS_BEARER_TOKEN_BEDROCK",
            format!("ABSK{}", r.chars(132, B64)),
        ),
        // Names and values apart (issue 19): keys between them, value
        // first, pretty-printed JSON, a GitHub Actions log's env block.
        64 => ("generic.named-secret-yaml", "", {
            let name = r.pick(&["PAYMENTS_API_KEY", "SMTP_PASSWORD", "PARTNER_TOKEN"]);
            let v = r.chars(32, B62);
            format!(
                "  - name: {name}\n    description: set by the platform team\n    # rotated quarterly\n    type: secret\n    value: \"{v}\""
            )
        }),
        65 => ("generic.named-secret-yaml-value-first", "", {
            let name = r.pick(&["COHERE_API_KEY", "INTERNAL_SERVICE_TOKEN", "DB_PASSWORD"]);
            let v = r.chars(36, B62);
            format!("        - value: \"{v}\"\n          name: {name}")
        }),
        66 => ("generic.named-secret-json-value-first", "", {
            let name = r.pick(&["OPENAI_API_KEY", "PAYMENTS_SECRET", "service_token"]);
            let v = r.chars(40, B62);
            format!("{{\"value\": \"{v}\", \"type\": \"secret\", \"name\": \"{name}\"}},")
        }),
        67 => ("generic.named-secret-json", "", {
            let name = r.pick(&["partner_api_key", "internal_token", "WEBHOOK_SECRET"]);
            let v = r.chars(40, B62);
            format!(
                "    {{\n      \"key\": \"{name}\",\n      \"value\": \"{v}\",\n      \"type\": \"secret\",\n      \"enabled\": true\n    }},"
            )
        }),
        68 => ("generic.actions-log-env", "", {
            let v = r.chars(40, B62);
            let t = format!("{}.1234567Z", log_time(r));
            format!(
                "{t} ##[group]Run ./scripts/deploy.sh\n{t} shell: /usr/bin/bash -e {{0}}\n{t} env:\n{t}   REGION: eu-west-1\n{t}   SERVICE_API_KEY: {v}\n{t} ##[endgroup]"
            )
        }),
        // Session 38's classes: a URL's user info under any scheme, a
        // password under a lower-case name, `.netrc`, Docker's `auths`, a
        // Basic header, a key under a lower- or mixed-case name (design
        // 0004, "session 38").
        69 => ("uri.credentials", "", {
            let v = r.chars(28, B62);
            format!(
                "git remote add origin https://deploy:{v}@git-{}.corp.internal/team/app.git",
                r.below(9)
            )
        }),
        70 => ("generic.password", "", {
            let v = digit_led(r, 23);
            let name = r.pick(&[
                "db_password",
                "password",
                "smtp_password",
                "spring.datasource.password",
            ]);
            match r.below(3) {
                0 => format!("{name} = \"{v}\""),
                1 => format!("{name}={v}"),
                _ => format!("    {name}: \"{v}\""),
            }
        }),
        71 => ("generic.netrc", "", {
            let v = digit_led(r, 31);
            format!(
                "machine api-{}.corp.internal login ci-bot password {v}",
                r.below(9)
            )
        }),
        72 => ("docker.config-auth", "", {
            let v = basic(&format!("ci-bot:{}", r.chars(32, B62)));
            format!(
                "{{\"auths\": {{\"registry-{}.corp.internal\": {{\"auth\": \"{v}\"}}}}}}",
                r.below(9)
            )
        }),
        73 => ("generic.basic-auth", "", {
            let v = basic(&format!("svc-metrics:{}", r.chars(28, B62)));
            format!(
                "{}Z DEBUG > GET /metrics HTTP/1.1 | Authorization: Basic {v}",
                log_time(r)
            )
        }),
        74 => ("generic.api-key", "", {
            let v = digit_led(r, 31);
            match r.below(3) {
                0 => format!("client = Client(api_key=\"{v}\", timeout=30)"),
                1 => format!("  apiKey: '{v}',"),
                _ => format!("{{\"clientId\": \"orders\", \"clientSecret\": \"{v}\"}}"),
            }
        }),
        // Session 39's: a key under a header's name, a snake-case name or
        // `apiToken` (design 0004, "session 39").
        75 => ("generic.api-key", "", {
            let v = digit_led(r, 31);
            match r.below(5) {
                0 => format!(
                    "curl -s https://inventory-{}.corp.internal/v1/items -H 'x-api-key: {v}'",
                    r.below(9)
                ),
                1 => format!(
                    "{}Z DEBUG > POST /v1/jobs HTTP/1.1 | X-API-Key: {v}",
                    log_time(r)
                ),
                2 => format!("  client_secret: {v}"),
                3 => format!(
                    "{{\"access_token\":\"{v}\",\"token_type\":\"Bearer\",\"expires_in\":3600}}"
                ),
                _ => format!("const apiToken = \"{v}\";"),
            }
        }),
        // Session 40's: a name/value pair escaped into a JSON string (an
        // applied manifest as `kubectl get -o json` prints it, an ECS
        // task's definitions in Terraform state, a logged body).
        76 => {
            let v = r.chars(40, B62);
            match r.below(3) {
                0 => ("generic.named-secret-json", "", {
                    let name = r.pick(&["PAYMENTS_API_KEY", "INTERNAL_SERVICE_TOKEN"]);
                    format!(
                        "    \"kubectl.kubernetes.io/last-applied-configuration\": \"{{\\\"apiVersion\\\":\\\"apps/v1\\\",\\\"kind\\\":\\\"Deployment\\\",\\\"spec\\\":{{\\\"template\\\":{{\\\"spec\\\":{{\\\"containers\\\":[{{\\\"env\\\":[{{\\\"name\\\":\\\"{name}\\\",\\\"value\\\":\\\"{v}\\\"}}]}}]}}}}}}}}\\n\""
                    )
                }),
                1 => ("generic.named-secret-json", "", {
                    let name = r.pick(&["OPENAI_API_KEY", "DB_PASSWORD"]);
                    format!(
                        "            \"container_definitions\": \"[{{\\\"environment\\\":[{{\\\"name\\\":\\\"{name}\\\",\\\"value\\\":\\\"{v}\\\"}}],\\\"essential\\\":true}}]\","
                    )
                }),
                _ => ("generic.named-secret-json-value-first", "", {
                    format!(
                        "{}Z INFO request body=\"{{\\\"value\\\":\\\"{v}\\\",\\\"name\\\":\\\"partner_token\\\"}}\"",
                        log_time(r)
                    )
                }),
            }
        }
        // Session 40's: kebab-case names (Spring's properties and YAML,
        // a MinIO client's settings, OpenStack's header), some under a
        // dotted prefix.
        77 => ("generic.api-key", "", {
            let v = digit_led(r, 31);
            match r.below(5) {
                0 => format!(
                    "spring.security.oauth2.client.registration.partner{}.client-secret={v}",
                    r.below(9)
                ),
                1 => format!("            client-secret: {v}"),
                2 => format!("minio.secret-key={v}"),
                3 => format!(
                    "{}Z DEBUG > GET /v2.1/servers HTTP/1.1 | X-Auth-Token: {v}",
                    log_time(r)
                ),
                _ => format!("  access-token: {v}"),
            }
        }),
        _ => ("private-key.pem", "", {
            let mut s = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
            for _ in 0..6 {
                s.push_str(&r.chars(70, B64));
                s.push('\n');
            }
            s.push_str("-----END OPENSSH PRIVATE KEY-----");
            s
        }),
    };
    let line = if var.is_empty() {
        secret.clone()
    } else {
        match r.below(3) {
            0 => format!("{var}={secret}"),
            1 => format!("    {var}: \"{secret}\""),
            _ => format!("export {var}='{secret}'"),
        }
    };
    // Structure rules: the secret is one part of the planted line.
    let between = |s: &str, a: &str, b: &str| -> String {
        s.split(a)
            .nth(1)
            .and_then(|t| t.split(b).next())
            .unwrap_or_default()
            .to_owned()
    };
    let secret = match rule {
        "generic.named-secret-json"
        | "generic.named-secret-yaml"
        | "generic.named-secret-json-value-first"
        | "generic.named-secret-yaml-value-first" => between(&secret, "value: \"", "\"")
            .max(between(&secret, "\"value\": \"", "\""))
            .max(between(&secret, "\\\"value\\\":\\\"", "\\\"")),
        "generic.bearer" => between(&secret, "Bearer ", "\n"),
        "generic.actions-log-env" => between(&secret, "SERVICE_API_KEY: ", "\n"),
        "uri.password" => between(&secret, "://app:", "@"),
        "uri.credentials" => between(&secret, "://deploy:", "@"),
        "generic.password" => {
            let v = secret
                .rsplit([' ', '=', '"'])
                .find(|p| !p.is_empty())
                .unwrap_or_default();
            v.to_owned()
        }
        "generic.netrc" => secret.rsplit(' ').next().unwrap_or_default().to_owned(),
        // The value: the one run of 32 letters and digits on the line.
        "generic.api-key" => secret
            .split(|c: char| !c.is_ascii_alphanumeric())
            .find(|p| p.len() == 32)
            .unwrap_or_default()
            .to_owned(),
        "docker.config-auth" => between(&secret, "\"auth\": \"", "\""),
        "generic.basic-auth" => between(&secret, "Basic ", "\n"),
        _ => secret,
    };
    // The storage key's secret is the part after `AccountKey=`.
    let secret = if rule == "azure.storage-account-key" {
        secret
            .split("AccountKey=")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .unwrap_or_default()
            .to_owned()
    } else {
        secret
    };
    (rule, line, secret)
}

const KINDS: usize = 79;

const WORDS: &[&str] = &[
    "request",
    "response",
    "handler",
    "config",
    "token",
    "session",
    "client",
    "server",
    "value",
    "result",
    "error",
    "index",
    "buffer",
    "stream",
    "model",
    "prompt",
    "embedding",
    "vector",
    "cache",
    "retry",
    "timeout",
    "user",
    "account",
    "secret",
    "password",
    "key",
    "deploy",
    "build",
    "status",
    "message",
    "payload",
    "header",
];

/// One decoy line in the style of `style`.
fn decoy_line(r: &mut Rng, style: usize, out: &mut String) {
    let w1 = r.pick(WORDS);
    let w2 = r.pick(WORDS);
    match (style, r.below(16)) {
        // Placeholders and documentation examples: never findings.
        (_, 0) => {
            let d = r.pick(&[
                "OPENAI_API_KEY=sk-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                "ANTHROPIC_API_KEY=<YOUR_KEY>",
                "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
                "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "GITHUB_TOKEN=ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                "SLACK_WEBHOOK_URL=https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
                "api_key = \"${OPENAI_API_KEY}\"",
                "# Set HF_TOKEN=hf_... in your environment",
                "password = \"changeme\"",
                "STRIPE_SECRET_KEY=sk_test_51HqLyjWDarjtT1zdp7dcXEXAMPLE",
                "DATABASE_URL=postgres://postgres:postgres@localhost:5432/test",
                "REDIS_URL=redis://:${REDIS_PASSWORD}@cache:6379/0",
                "curl -H \"Authorization: Bearer $API_TOKEN\" https://api.internal/v1/jobs",
                "  {\"name\": \"API_TOKEN\", \"value\": \"<set in the CI settings>\"},",
                "  {\"name\": \"LOG_LEVEL\", \"value\": \"debug\"},",
                // Kebab-case names whose value is none (session 40).
                "spring.security.oauth2.client.registration.github.client-secret=${GITHUB_CLIENT_SECRET}",
                "curl -H \"X-Auth-Token: $OS_TOKEN\" https://compute.corp.internal:8774/v2.1/servers",
                // An escaped pair whose value is none (session 40).
                "    \"container_definitions\": \"[{\\\"environment\\\":[{\\\"name\\\":\\\"OPENAI_API_KEY\\\",\\\"value\\\":\\\"<set in the console>\\\"}],\\\"essential\\\":true}]\",",
                "VAULT_TOKEN=hvs.<token from vault login>",
                // Credential names whose value is none (session 39).
                "curl https://api.anthropic.com/v1/messages -H \"x-api-key: $ANTHROPIC_API_KEY\"",
                "{\"access_token\": null, \"token_type\": \"Bearer\"}",
                "  client_secret: ${OIDC_CLIENT_SECRET}",
                "Authorization: OAuth oauth_consumer_key=\"0685bd9184jfhq22\", oauth_token=\"ad180jjd733klru7\"",
                // Demo passwords to local servers, digests and identifiers
                // under secret-sounding names (issue 19).
                "MONGO_URL=mongodb://admin:admin123@localhost:27017/app",
                "DATABASE_URL=postgres://postgres:mysecretpassword@localhost:5432/postgres",
                "  {\"name\": \"MODEL_TOKEN_CHECKSUM\", \"value\": \"9f2c4e7a1b3d5f60718293a4b5c6d7e8f9012a3b4c5d6e7f8091a2b3c4d5e6f7\"},",
                "  {\"value\": \"3f2a9c1e-7b4d-4e8a-9c2f-1a2b3c4d5e6f\", \"name\": \"REQUEST_TOKEN_ID\"},",
                "      - name: REQUEST_TOKEN_ID\n        value: 3f2a9c1e-7b4d-4e8a-9c2f-1a2b3c4d5e6f",
                "      - name: API_KEY_SHA256\n        value: 9f2c4e7a1b3d5f60718293a4b5c6d7e8f9012a3b4c5d6e7f8091a2b3c4d5e6f7",
                "2026-11-30T10:00:01.1234567Z ##[group]Run make test\n2026-11-30T10:00:01.1234567Z env:\n2026-11-30T10:00:01.1234567Z   GITHUB_TOKEN: ***\n2026-11-30T10:00:01.1234567Z   BUILD_TOKEN_SHA256: 9f2c4e7a1b3d5f60718293a4b5c6d7e8f9012a3b4c5d6e7f8091a2b3c4d5e6f7\n2026-11-30T10:00:01.1234567Z ##[endgroup]",
            ]);
            out.push_str(d);
        }
        // Hashes, UUIDs, base64: high entropy, not secrets.
        (_, 1) => {
            let _ = write!(out, "sha256: {}  {}.tar.gz", r.chars(64, HEX), w1);
        }
        (_, 2) => {
            let _ = write!(
                out,
                "id: {}-{}-{}-{}-{}",
                r.chars(8, HEX),
                r.chars(4, HEX),
                r.chars(4, HEX),
                r.chars(4, HEX),
                r.chars(12, HEX)
            );
        }
        (_, 3) => {
            let _ = write!(out, "\"integrity\": \"sha512-{}==\",", r.chars(86, B64));
        }
        (_, 4) => {
            let _ = write!(out, "commit {} Merge branch '{w1}-{w2}'", r.chars(40, HEX));
        }
        (0, _) => {
            let _ = write!(
                out,
                "    def {w1}_{w2}(self, {w1}: str) -> dict:  # returns the {w2}"
            );
        }
        (1, _) => {
            let _ = write!(
                out,
                "  {w1}_{w2}: {}  # {w2} for the {w1} task-service",
                r.below(10_000)
            );
        }
        (2, _) => {
            let _ = write!(
                out,
                "2026-11-{:02}T{:02}:{:02}:{:02}.{:03}Z INFO [{w1}] {w2} completed in {} ms (desk-{} risk-{})",
                1 + r.below(28),
                r.below(24),
                r.below(60),
                r.below(60),
                r.below(1000),
                r.below(5000),
                r.below(100),
                r.below(9)
            );
        }
        (3, _) => {
            let _ = write!(
                out,
                "  \"{w1}\": {{ \"version\": \"{}.{}.{}\", \"{w2}\": true }},",
                r.below(9),
                r.below(30),
                r.below(99)
            );
        }
        _ => {
            let _ = write!(
                out,
                "The {w1} sends the {w2} to the server; see the {w1} guide for the skeleton of a {w2}."
            );
        }
    }
    out.push('\n');
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--keys") {
        let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(KINDS);
        let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
        return keys(n, seed);
    }
    let Some(dir) = args.get(1).map(PathBuf::from) else {
        eprintln!("usage: gen_corpus OUT_DIR [SIZE_MB] [SEED] | gen_corpus --keys N SEED");
        std::process::exit(2);
    };
    let size_mb: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(512);
    let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    generate(&dir, size_mb << 20, seed)
}

fn json_str(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn keys(n: usize, seed: u64) -> std::io::Result<()> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut out = std::io::stdout().lock();
    for i in 0..n {
        let (rule, line, secret) = planted_line(&mut r, i % KINDS);
        writeln!(
            out,
            "{{\"rule\":\"{rule}\",\"line\":\"{}\",\"secret\":\"{}\"}}",
            json_str(&line),
            json_str(&secret)
        )?;
    }
    Ok(())
}

fn generate(dir: &Path, total: u64, seed: u64) -> std::io::Result<()> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    std::fs::create_dir_all(dir)?;
    let mut manifest = std::fs::File::create(dir.join("planted.jsonl"))?;
    let exts = ["py", "yaml", "log", "json", "md"];
    let mut written = 0u64;
    let mut file_no = 0usize;
    let mut planted = 0usize;
    let mut buf = String::new();
    while written < total {
        let style = r.below(exts.len());
        // Mostly small files, some large CI logs.
        let size = if style == 2 && r.below(40) == 0 {
            (8 << 20) + r.below(8 << 20)
        } else {
            1024 + r.below(48 << 10)
        };
        let sub = format!("d{:03}", file_no % 200);
        std::fs::create_dir_all(dir.join("files").join(&sub))?;
        let rel = format!("files/{sub}/f{file_no:06}.{}", exts[style]);
        buf.clear();
        let mut line_no = 0u64;
        while buf.len() < size {
            // About one planted key per 512 KiB, rotating through every kind.
            if r.below(8000) == 0 {
                let (rule, line, secret) = planted_line(&mut r, planted % KINDS);
                planted += 1;
                // The line the secret starts on (a YAML pair spans two).
                let first_line = line_no
                    + 1
                    + line
                        .find(secret.get(..8).unwrap_or(&secret))
                        .map_or(0, |at| line[..at].matches('\n').count() as u64);
                writeln!(
                    manifest,
                    "{{\"file\":\"{rel}\",\"line\":{first_line},\"rule\":\"{rule}\",\"secret\":\"{}\"}}",
                    json_str(&secret)
                )?;
                line_no += line.matches('\n').count() as u64 + 1;
                buf.push_str(&line);
                buf.push('\n');
                continue;
            }
            let at = buf.len();
            decoy_line(&mut r, style, &mut buf);
            // Some decoys span lines (a YAML pair, an Actions log block).
            line_no += buf[at..].matches('\n').count() as u64;
        }
        std::fs::write(dir.join(&rel), buf.as_bytes())?;
        written += buf.len() as u64;
        file_no += 1;
    }
    // A dotfile and a gzip-compressed log with planted keys too.
    eprintln!(
        "{} files, {} MiB, {planted} planted keys",
        file_no,
        written >> 20
    );
    Ok(())
}
