//! Keys without a provider marker whose name and value sit apart (issue
//! 19): realistic Kubernetes manifests, Postman environments and GitHub
//! Actions logs, and the demo passwords, digests and identifiers that look
//! like secrets but are not. Every value is generated here at run time.

use std::collections::BTreeSet;

use crate::{B62, Rng, findings, p, run_json};

/// (file name, line, rule, secret) of every location found under `dir`.
fn found(dir: &std::path::Path) -> BTreeSet<(String, u64, String, String)> {
    let (_, doc, _) = run_json(&["--show-secrets", p(dir)]);
    let mut out = BTreeSet::new();
    for f in findings(&doc) {
        for l in f["locations"].as_array().unwrap() {
            let path = l["path"].as_str().unwrap();
            let file = path.rsplit('/').next().unwrap().to_owned();
            out.insert((
                file,
                l["line"].as_u64().unwrap(),
                f["rule_id"].as_str().unwrap().to_owned(),
                f["secret"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

/// A value of `n` letters and digits after a digit: one that the name
/// rules' floors (a digit, 3.5 bits a byte) take.
fn digit_led(rng: &mut Rng, n: usize) -> String {
    format!("{}{}", rng.chars(1, b"0123456789"), rng.chars(n, B62))
}

/// Writes a file named `name` under `dir`.
fn writer(dir: &std::path::Path) -> impl Fn(&str, &str) + '_ {
    move |name, text| std::fs::write(dir.join(name), text).unwrap()
}

fn hit(file: &str, line: u64, rule: &str, secret: &str) -> (String, u64, String, String) {
    (file.into(), line, rule.into(), secret.into())
}

/// Asserts that the findings under `dir` are `want`, no more, no fewer.
fn assert_found<const N: usize>(dir: &std::path::Path, want: [(String, u64, String, String); N]) {
    assert_eq!(found(dir), BTreeSet::from(want));
}

#[test]
fn values_on_another_line_than_their_name_are_found_in_either_order() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c, d, e, noise) = (
        rng.chars(40, B62),
        rng.chars(32, B62),
        rng.chars(36, B62),
        rng.chars(44, B62),
        rng.chars(28, B62),
        rng.chars(40, B62),
    );
    // A Deployment's env list: name first with a key in between, value
    // first, a secretKeyRef neighbour whose next item is not a secret.
    let deployment = format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: triage-bot
spec:
  template:
    spec:
      containers:
        - name: bot
          image: registry.internal/triage-bot:1.4.2
          env:
            - name: LOG_LEVEL
              value: info
            - name: COHERE_API_KEY
              # rotated by hand, see the runbook
              value: \"{a}\"
            - value: {b}
              name: PAYMENTS_SERVICE_TOKEN
            - name: OPENAI_API_KEY
              valueFrom:
                secretKeyRef:
                  name: openai
                  key: api-key
            - name: BUILD_REF
              value: {noise}
"
    );
    std::fs::write(dir.path().join("deployment.yaml"), &deployment).unwrap();
    // A CI variables file: other keys between name and value, CRLF ends.
    let variables = format!(
        "variables:\r\n  - name: DB_PASSWORD\r\n    description: primary database\r\n    masked: false\r\n    value: {c}\r\n"
    );
    std::fs::write(dir.path().join("variables.yml"), variables).unwrap();
    // A Postman environment, pretty-printed, one member value first.
    let postman = format!(
        "{{
  \"id\": \"6f1e2d3c-aaaa-4bbb-8ccc-0123456789ab\",
  \"name\": \"staging\",
  \"values\": [
    {{
      \"key\": \"baseUrl\",
      \"value\": \"https://staging.internal\",
      \"type\": \"default\",
      \"enabled\": true
    }},
    {{
      \"key\": \"partner_api_key\",
      \"value\": \"{d}\",
      \"type\": \"secret\",
      \"enabled\": true
    }},
    {{
      \"value\": \"{e}\",
      \"enabled\": true,
      \"key\": \"internal_token\"
    }}
  ]
}}
"
    );
    std::fs::write(dir.path().join("staging.postman_environment.json"), postman).unwrap();

    // A CloudFormation ECS task definition: `Name:` and `Value:`.
    let f = rng.chars(40, B62);
    let cfn = format!(
        "Resources:
  TaskDefinition:
    Type: AWS::ECS::TaskDefinition
    Properties:
      ContainerDefinitions:
        - Name: worker
          Environment:
            - Name: STAGE
              Value: prod
            - Name: PARTNER_API_TOKEN
              Value: {f}
"
    );
    std::fs::write(dir.path().join("task.yaml"), cfn).unwrap();

    assert_found(
        dir.path(),
        [
            hit("task.yaml", 11, "generic.named-secret-yaml", &f),
            hit("deployment.yaml", 16, "generic.named-secret-yaml", &a),
            hit(
                "deployment.yaml",
                17,
                "generic.named-secret-yaml-value-first",
                &b,
            ),
            hit("variables.yml", 5, "generic.named-secret-yaml", &c),
            hit(
                "staging.postman_environment.json",
                13,
                "generic.named-secret-json",
                &d,
            ),
            hit(
                "staging.postman_environment.json",
                18,
                "generic.named-secret-json-value-first",
                &e,
            ),
        ],
    );
}

#[test]
fn a_github_actions_log_env_block_names_the_secret() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let (key, upload, sha) = (
        rng.chars(40, B62),
        rng.chars(36, B62),
        rng.chars(64, b"0123456789abcdef"),
    );
    let t = "2026-11-30T10:00:01.1234567Z";
    let log = format!(
        "{t} Requested labels: ubuntu-latest
{t} ##[group]Run ./scripts/deploy.sh --region eu-west-1
{t} \u{1b}[36;1m./scripts/deploy.sh --region eu-west-1\u{1b}[0m
{t} shell: /usr/bin/bash -e {{0}}
{t} env:
{t}   REGION: eu-west-1
{t}   GITHUB_TOKEN: ***
{t}   MODEL_TOKEN_SHA256: {sha}
{t}   REQUEST_TOKEN_ID: 3f2a9c1e-7b4d-4e8a-9c2f-1a2b3c4d5e6f
{t}   SERVICE_API_KEY: {key}
{t} ##[endgroup]
{t} deployed
{t} ##[group]Run actions/upload-artifact@v4
{t} with:
{t}   name: report
{t}   upload-token: {upload}
{t} ##[endgroup]
"
    );
    std::fs::write(dir.path().join("job-4412.log"), log).unwrap();
    // The same line in a file that is not an Actions log is not this
    // rule's: a lower-case name that says credential is
    // `generic.api-key`'s (a value with a digit: the first one here), an
    // upper-case one an environment variable's (`generic.env-assignment`).
    let plain = rng.chars(40, B62);
    let lower = digit_led(&mut rng, 39);
    std::fs::write(
        dir.path().join("app.log"),
        format!("{t} config:\n{t}   service_api_key: {lower}\n{t}   SERVICE_API_KEY: {plain}\n"),
    )
    .unwrap();
    assert_found(
        dir.path(),
        [
            hit("job-4412.log", 10, "generic.actions-log-env", &key),
            hit("job-4412.log", 16, "generic.actions-log-env", &upload),
            hit("app.log", 2, "generic.api-key", &lower),
            hit("app.log", 3, "generic.env-assignment", &plain),
        ],
    );
}

/// An environment variable's name as a JSON member's (`"NAME": "value"`: a
/// Lambda function's configuration, a `Secret` printed as JSON) and in JSON
/// escaped into a string (`\"NAME\":\"value\"`: the `last-applied-
/// configuration` annotation, a request body in a log line, a string in
/// code, a notebook's cell), as a subscript (`os.environ["NAME"] =
/// "value"`) and beside its value as two quoted arguments
/// (`os.Setenv("NAME", "value")`), reads as it does in a `.env` file; a
/// list of names is not a name and its value; the same names that are not
/// secrets' and references are still not findings.
#[test]
fn secrets_under_a_variables_name_in_json_escaped_json_subscripts_and_arguments_are_found() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let put = writer(dir.path());
    let (lambda, applied, body, vultr, aws, id, cache) = (
        rng.chars(40, B62),
        rng.chars(24, B62),
        rng.chars(32, B62),
        rng.chars(36, b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        rng.chars(
            40,
            b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz/+",
        ),
        rng.chars(40, B62),
        rng.chars(40, B62),
    );
    // `aws lambda get-function-configuration`, pretty-printed.
    let function = format!(
        "{{\n    \"FunctionName\": \"triage-bot\",\n    \"Environment\": {{\n        \"Variables\": {{\n            \"LOG_LEVEL\": \"debug\",\n            \"PAYMENTS_API_KEY\": \"{lambda}\",\n            \"PAYMENTS_API_KEY_ID\": \"{id}\",\n            \"VULTR_API_KEY\": \"{vultr}\",\n            \"OPENAI_API_KEY\": \"${{OPENAI_API_KEY}}\"\n        }}\n    }}\n}}\n"
    );
    put("function.json", &function);
    // `kubectl get secret -o json`: the applied manifest kept as a string.
    let secret = format!(
        "{{\n  \"apiVersion\": \"v1\",\n  \"kind\": \"Secret\",\n  \"metadata\": {{\n    \"annotations\": {{\n      \"kubectl.kubernetes.io/last-applied-configuration\": \"{{\\\"apiVersion\\\":\\\"v1\\\",\\\"kind\\\":\\\"Secret\\\",\\\"metadata\\\":{{\\\"name\\\":\\\"db\\\"}},\\\"stringData\\\":{{\\\"DB_PASSWORD\\\":\\\"{applied}\\\",\\\"CACHE_KEY\\\":\\\"{cache}\\\"}}}}\\n\"\n    }}\n  }}\n}}\n"
    );
    put("secret.json", &secret);
    // A request logged with its body, and a Java string.
    put(
        "gateway.log",
        &format!(
            "2026-12-07T10:00:00Z POST /billing body=\"{{\\\"BILLING_SECRET\\\":\\\"{body}\\\"}}\" 201\n"
        ),
    );
    put(
        "Upload.java",
        &format!(
            "class Upload {{\n  static final String CONF = \"{{\\\"awsSecretKey\\\":\\\"{aws}\\\"}}\";\n}}\n"
        ),
    );
    // A notebook's cell setting the environment, and the same in a script.
    let (cell, script) = (rng.chars(40, B62), rng.chars(32, B62));
    put(
        "setup.ipynb",
        &format!(
            "{{\"cells\": [{{\"cell_type\": \"code\", \"source\": [\"import os\\n\", \"os.environ[\\\"PARTNER_TOKEN\\\"] = \\\"{cell}\\\"\\n\"]}}]}}\n"
        ),
    );
    put(
        "run.py",
        &format!("import os\n\nos.environ['BILLING_SECRET'] = '{script}'\n"),
    );
    // A name and a value as two quoted arguments; a list of names is not.
    let (go, php) = (rng.chars(40, B62), rng.chars(28, B62));
    put(
        "main.go",
        &format!("func init() {{\n\tos.Setenv(\"PAYMENTS_SERVICE_TOKEN\", \"{go}\")\n}}\n"),
    );
    put(
        "wp-config.php",
        &format!("<?php\ndefine( 'DB_USER', 'wordpress' );\ndefine( 'DB_PASSWORD', '{php}' );\n"),
    );
    put(
        "check.py",
        "REQUIRED = [\"OPENAI_API_KEY\", \"OAUTH2_CLIENT_SECRET_V2\", \"PAYMENTS_SERVICE_TOKEN\"]\n",
    );
    assert_found(
        dir.path(),
        [
            hit("main.go", 2, "generic.env-assignment", &go),
            hit("wp-config.php", 3, "generic.env-assignment", &php),
            hit("setup.ipynb", 1, "generic.env-assignment", &cell),
            hit("run.py", 3, "generic.env-assignment", &script),
            hit("function.json", 6, "generic.env-assignment", &lambda),
            hit("function.json", 8, "vultr.api-key", &vultr),
            hit("secret.json", 6, "generic.env-assignment", &applied),
            hit("gateway.log", 1, "generic.env-assignment", &body),
            hit("Upload.java", 2, "aws.secret-access-key", &aws),
        ],
    );
}

#[test]
fn demo_passwords_digests_and_identifiers_are_not_findings() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let sha = rng.chars(64, b"0123456789abcdef");
    let uuid = format!(
        "{}-{}-4{}-a{}-{}",
        rng.chars(8, b"0123456789abcdef"),
        rng.chars(4, b"0123456789abcdef"),
        rng.chars(3, b"0123456789abcdef"),
        rng.chars(3, b"0123456789abcdef"),
        rng.chars(12, b"0123456789abcdef")
    );
    // A docker-compose file and a README as tutorials write them.
    let compose = format!(
        "services:
  app:
    environment:
      MONGO_URL: mongodb://admin:admin123@localhost:27017/app
      DATABASE_URL: postgres://postgres:mysecretpassword@localhost:5432/postgres
      REDIS_URL: redis://:devpassword2024@127.0.0.1:6379/0
      JDBC_URL: jdbc:postgresql://localhost:5432/app?user=app&password=localdevpass1
    env:
      - name: MODEL_TOKEN_CHECKSUM
        value: {sha}
      - name: REQUEST_TOKEN_ID
        value: {uuid}
"
    );
    std::fs::write(dir.path().join("docker-compose.yml"), compose).unwrap();
    let json = format!(
        "[{{\"name\": \"MODEL_TOKEN_CHECKSUM\", \"value\": \"{sha}\"}},
 {{\"name\": \"requestTokenId\", \"value\": \"{uuid}\"}},
 {{\"value\": \"{sha}\", \"name\": \"API_KEY_SHA256\"}}]
"
    );
    std::fs::write(dir.path().join("env.json"), json).unwrap();
    // A context rule's variable name says the same (Azure OpenAI keys are
    // 32 hex digits, as an MD5 is).
    let md5 = rng.chars(32, b"0123456789abcdef");
    std::fs::write(
        dir.path().join("azure.env"),
        format!(
            "AZURE_OPENAI_KEY_ID={md5}\nAZURE_OPENAI_API_KEY_MD5={md5}\nTOGETHER_API_KEY_SHA256={sha}\n"
        ),
    )
    .unwrap();
    assert_eq!(found(dir.path()), BTreeSet::new());

    // The same shapes with a random password, or a real host, are found.
    let pw = rng.chars(24, B62);
    std::fs::write(
        dir.path().join("real.env"),
        format!(
            "DATABASE_URL=postgres://app:{pw}@localhost:5432/app\nMONGO_URL=mongodb://admin:admin123x@mongo.prod.internal:27017/app\n"
        ),
    )
    .unwrap();
    assert_found(
        dir.path(),
        [
            hit("real.env", 1, "uri.password", &pw),
            hit("real.env", 2, "uri.password", "admin123x"),
        ],
    );
}

/// A password in a URI's user info under any scheme: a database URL with a
/// driver after a `+` (SQLAlchemy), a git remote and stored git
/// credentials, a private package index, a proxy, an SMTP relay; and the
/// URLs around them that hold none (templates, placeholders, a token as the
/// user beside GitHub's fixed `x-oauth-basic`, word-shaped passwords in a
/// manual's example) are not findings.
#[test]
fn passwords_in_urls_under_any_scheme_are_found() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let put = writer(dir.path());
    let (db, git, index, proxy, smtp) = (
        rng.chars(24, B62),
        rng.chars(32, B62),
        rng.chars(28, B62),
        rng.chars(20, B62),
        rng.chars(22, B62),
    );
    put(
        "settings.py",
        &format!(
            "import os\n\nSQLALCHEMY_DATABASE_URI = \"postgresql+psycopg2://orders:{db}@db.prod.internal:5432/orders\"\nTEMPLATE = f\"{{scheme}}://{{user}}:{{password}}@{{host}}/{{name}}\"\n"
        ),
    );
    put(
        ".git-credentials",
        &format!("https://deploy-bot:{git}@git.corp.internal\n"),
    );
    put(
        "pip.conf",
        &format!("[global]\nindex-url = https://ci:{index}@pypi.corp.internal/simple\n"),
    );
    put(
        "proxy.env",
        &format!(
            "HTTPS_PROXY=http://svc-build:{proxy}@proxy.corp.internal:3128\nNO_PROXY=localhost,127.0.0.1\n"
        ),
    );
    put(
        "mail.yaml",
        &format!("relay: smtp+starttls://alerts:{smtp}@smtp.corp.internal:587\n"),
    );
    let hex = rng.chars(40, b"0123456789abcdef");
    put(
        "README.md",
        &format!(
            "Clone with `git clone https://{hex}:x-oauth-basic@github.com/org/repo.git`,\n\
             or through a proxy: `http://user:password@proxy.example.com:3128`.\n\
             In CI: https://x-access-token:${{{{ secrets.GITHUB_TOKEN }}}}@github.com/org/repo\n\
             The demo server: https://demo:demopass2024@api.example.com/v1 and http://localhost:8080/\n"
        ),
    );
    assert_found(
        dir.path(),
        [
            hit("settings.py", 3, "uri.password", &db),
            hit(".git-credentials", 1, "uri.credentials", &git),
            hit("pip.conf", 2, "uri.credentials", &index),
            hit("proxy.env", 1, "uri.credentials", &proxy),
            hit("mail.yaml", 1, "uri.credentials", &smtp),
        ],
    );
}

/// A generated password under a lower-case or mixed-case name, in the
/// files that hold one: Spring's `application.properties`, an ASP.NET
/// `appsettings.json` connection string, Maven's `settings.xml`, an ODBC
/// connection string, a YAML config, MySQL's `.my.cnf`, code, `.netrc`;
/// and the code around such names that holds no password (types,
/// arguments, references, paths, a manual's example) is not a finding.
#[test]
fn passwords_under_lower_case_names_in_configuration_are_found() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let put = writer(dir.path());
    // A digit first, so every value holds one (the rule asks for a digit).
    let mut pw = || digit_led(&mut rng, 23);
    let (spring, ado, maven, odbc, yaml, cnf, code) = (pw(), pw(), pw(), pw(), pw(), pw(), pw());
    let netrc = rng.chars(32, B62);
    put(
        "application.properties",
        &format!(
            "spring.datasource.url=jdbc:postgresql://db.prod.internal:5432/orders\nspring.datasource.username=orders\nspring.datasource.password={spring}\n"
        ),
    );
    put(
        "appsettings.json",
        &format!(
            "{{\n  \"ConnectionStrings\": {{\n    \"Orders\": \"Server=sql.prod.internal;Database=orders;User Id=orders;Password={ado};Encrypt=True;\"\n  }}\n}}\n"
        ),
    );
    put(
        "settings.xml",
        &format!(
            "<settings>\n  <servers>\n    <server>\n      <id>releases</id>\n      <username>ci</username>\n      <password>{maven}</password>\n    </server>\n  </servers>\n</settings>\n"
        ),
    );
    put(
        "odbc.txt",
        &format!(
            "Driver={{ODBC Driver 18 for SQL Server}};Server=tcp:sql.internal,1433;UID=svc;PWD={odbc};\n"
        ),
    );
    put(
        "config.yaml",
        &format!("database:\n  host: db.prod.internal\n  user: app\n  password: \"{yaml}\"\n"),
    );
    put(
        ".my.cnf",
        &format!("[client]\nuser = backup\npassword = {cnf}\nhost = db.prod.internal\n"),
    );
    put(
        "db.py",
        &format!("import psycopg\n\nhost = \"db.prod.internal\"\ndb_password = \"{code}\"\n"),
    );
    put(
        ".netrc",
        &format!(
            "machine api.corp.internal\n  login ci-bot\n  password {netrc}\n\nmachine raw.github.com login visionmedia password pass123\n"
        ),
    );
    put(
        "client.py",
        "def connect(self, user: str, password: Optional[str] = None) -> None:\n    \
         self.client.login(user=user, password=password)\n    \
         secret = os.environ.get('DB_PASSWORD')\n    \
         return {'password': '********', 'password_file': '/run/secrets/db_password'}\n",
    );
    put(
        "docs.md",
        "Set `password: ${DB_PASSWORD}` or `<password>${env.MAVEN_PASSWORD}</password>`;\n\
         the example uses `Password=MyPassword2024!;`.\n",
    );
    assert_found(
        dir.path(),
        [
            hit("application.properties", 3, "generic.password", &spring),
            hit("appsettings.json", 3, "generic.password", &ado),
            hit("settings.xml", 6, "generic.password", &maven),
            hit("odbc.txt", 1, "generic.password", &odbc),
            hit("config.yaml", 4, "generic.password", &yaml),
            hit(".my.cnf", 3, "generic.password", &cnf),
            hit("db.py", 4, "generic.password", &code),
            hit(".netrc", 3, "generic.netrc", &netrc),
        ],
    );
}

/// `user:password` in base64: a Docker `config.json` with several
/// registries (`docker login` writes one `auth` per registry) and a logged
/// request's `Authorization: Basic` header are found; an `auth` that
/// decodes to a typed password, a credentials store, a header built at run
/// time are not.
#[test]
fn registry_auths_and_basic_credentials_are_found_when_they_decode_to_a_password() {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let put = writer(dir.path());
    let ghcr = STANDARD.encode(format!("ci-bot:{}", rng.chars(36, B62)));
    let private = STANDARD.encode(format!("deploy@corp:{}", rng.chars(24, B62)));
    let typed = STANDARD.encode("admin:password123");
    put(
        "config.json",
        &format!(
            "{{\n\t\"auths\": {{\n\t\t\"ghcr.io\": {{\n\t\t\t\"auth\": \"{ghcr}\"\n\t\t}},\n\t\t\"registry.corp.internal:5000\": {{\n\t\t\t\"auth\": \"{private}\"\n\t\t}},\n\t\t\"registry.example.com\": {{\n\t\t\t\"auth\": \"{typed}\"\n\t\t}}\n\t}},\n\t\"credsStore\": \"desktop\"\n}}\n"
        ),
    );
    let basic = STANDARD.encode(format!("svc-metrics:{}", rng.chars(28, B62)));
    put(
        "access.log",
        &format!(
            "2026-12-07T10:00:01Z DEBUG GET /metrics headers={{\"Authorization\": \"Basic {basic}\", \"Accept\": \"*/*\"}}\n\
             2026-12-07T10:00:02Z DEBUG GET /health headers={{\"Authorization\": \"Basic {typed}\"}}\n"
        ),
    );
    put(
        "client.sh",
        "curl -H \"Authorization: Basic $(printf '%s:%s' \"$USER\" \"$PASS\" | base64)\" https://api.internal/\n",
    );
    assert_found(
        dir.path(),
        [
            hit("config.json", 4, "docker.config-auth", &ghcr),
            hit("config.json", 7, "docker.config-auth", &private),
            hit("access.log", 1, "generic.basic-auth", &basic),
        ],
    );
}

/// A key or token under a lower- or mixed-case name that says credential,
/// in code and configuration, is found; identifiers named like tokens
/// (`NextToken`, an object's `Key`), references, typed parameters, a
/// Stripe test key (its rule's to judge) and the OAuth RFC's example token
/// are not.
#[test]
fn keys_under_lower_and_mixed_case_credential_names_are_found() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let put = writer(dir.path());
    let mut key = || digit_led(&mut rng, 31);
    let (py, js, json) = (key(), key(), key());
    put(
        "client.py",
        &format!(
            "from billing import Client\n\nclient = Client(api_key=\"{py}\", timeout=30)\n\ndef make(api_key: Optional[str] = None):\n    return Client(api_key=api_key or os.environ[\"BILLING_API_KEY\"])\n"
        ),
    );
    put(
        "config.js",
        &format!(
            "module.exports = {{\n  endpoint: 'https://api.billing.internal',\n  apiKey: '{js}',\n}};\n"
        ),
    );
    put(
        "oauth.json",
        &format!(
            "{{\"clientId\": \"orders\", \"clientSecret\": \"{json}\", \"accessToken\": \"2YotnFZFEjr1zCsicMWpAA\"}}\n"
        ),
    );
    put(
        "listing.json",
        "{\"NextToken\": \"eyJNYXJrZXIiOiBudWxsLCAiYm90b190cnVuY2F0ZV9hbW91bnQiOiAyfQ==\", \"Contents\": [{\"Key\": \"reports/2026/q3-7f3a9c.csv\"}]}\n",
    );
    put(
        "stripe.py",
        "stripe_api_key = \"sk_test_51QZKWJVBt8Lw3RmZq6NhYx2KpV9cJd4FsGb7TnWe1UoAi5Rk0Mz\"\n",
    );
    assert_found(
        dir.path(),
        [
            hit("client.py", 3, "generic.api-key", &py),
            hit("config.js", 3, "generic.api-key", &js),
            hit("oauth.json", 1, "generic.api-key", &json),
        ],
    );
}

/// Keys under a header's name (`x-api-key`, `X-API-Key`, Azure OpenAI's
/// `api-key`), under snake-case names (`client_secret`, `secret_key`,
/// `access_token` in an OAuth token response) and `apiToken` (design 0004,
/// "session 39"); the same names with a reference, a null, OAuth 1's
/// `oauth_token` and names that only start like a credential's are left
/// alone.
#[test]
fn keys_under_header_and_snake_case_names_are_found() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let put = writer(dir.path());
    let mut key = || digit_led(&mut rng, 31);
    let (curl, log, azure, oidc, flask, token, refresh, js) =
        (key(), key(), key(), key(), key(), key(), key(), key());
    put(
        "call.sh",
        &format!(
            "#!/bin/sh\nset -eu\ncurl -s https://inventory.corp.internal/v1/items \\\n  -H 'x-api-key: {curl}' \\\n  -H 'Accept: application/json'\ncurl https://api.anthropic.com/v1/messages -H \"x-api-key: $ANTHROPIC_API_KEY\"\n"
        ),
    );
    put(
        "requests.log",
        &format!(
            "2026-11-30T10:00:01Z DEBUG > POST /v1/jobs HTTP/1.1\n2026-11-30T10:00:01Z DEBUG > X-API-Key: {log}\n2026-11-30T10:00:01Z DEBUG > Authorization: OAuth oauth_consumer_key=\"0685bd9184jfhq22\", oauth_token=\"ad180jjd733klru7\"\n"
        ),
    );
    put(
        "azure.json",
        &format!(
            "{{\n  \"api-key\": \"{azure}\",\n  \"api-version\": \"2024-10-21\",\n  \"api_url\": \"https://orders.openai.azure.com/openai/deployments/gpt-4o\"\n}}\n"
        ),
    );
    put(
        "oidc.yaml",
        &format!(
            "issuer: https://login.corp.internal\nclient_id: orders\nclient_secret: {oidc}\nstaging:\n  client_secret: ${{OIDC_CLIENT_SECRET}}\n"
        ),
    );
    put(
        "settings.py",
        &format!(
            "DEBUG = False\nsecret_key = \"{flask}\"\nfallback_secret_key = settings.SECRET_KEY\n"
        ),
    );
    put(
        "token.json",
        &format!(
            "{{\"access_token\":\"{token}\",\"token_type\":\"Bearer\",\"expires_in\":3600,\"refresh_token\":\"{refresh}\"}}\n{{\"access_token\": null, \"token_type\": \"Bearer\"}}\n"
        ),
    );
    put(
        "client.ts",
        &format!(
            "export const apiToken = \"{js}\";\nexport const apiTokenHeader = \"X-Api-Token\";\n"
        ),
    );
    assert_found(
        dir.path(),
        [
            hit("call.sh", 4, "generic.api-key", &curl),
            hit("requests.log", 2, "generic.api-key", &log),
            hit("azure.json", 2, "generic.api-key", &azure),
            hit("oidc.yaml", 3, "generic.api-key", &oidc),
            hit("settings.py", 2, "generic.api-key", &flask),
            hit("token.json", 1, "generic.api-key", &token),
            hit("token.json", 1, "generic.api-key", &refresh),
            hit("client.ts", 1, "generic.api-key", &js),
        ],
    );
}

/// A `{"name": …, "value": …}` pair escaped into a JSON string reads as it
/// does unescaped: the env list of a manifest's applied configuration as
/// `kubectl get -o json` prints it, an ECS task's container definitions
/// in Terraform state, a logged body written value first. A reference, a
/// placeholder, a digest and a name that says no secret stay unreported.
#[test]
fn name_value_pairs_escaped_into_a_json_string_are_found() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let put = writer(dir.path());
    let (applied, format, state, body) = (
        rng.chars(40, B62),
        rng.chars(40, B62),
        rng.chars(36, B62),
        rng.chars(32, B62),
    );
    let q = "\\\"";
    put(
        "deploy.json",
        &format!(
            "{{\n  \"apiVersion\": \"apps/v1\",\n  \"kind\": \"Deployment\",\n  \"metadata\": {{\n    \"annotations\": {{\n      \"kubectl.kubernetes.io/last-applied-configuration\": \"{{{q}apiVersion{q}:{q}apps/v1{q},{q}kind{q}:{q}Deployment{q},{q}spec{q}:{{{q}template{q}:{{{q}spec{q}:{{{q}containers{q}:[{{{q}env{q}:[{{{q}name{q}:{q}LOG_FORMAT{q},{q}value{q}:{q}{format}{q}}},{{{q}name{q}:{q}PAYMENTS_API_KEY{q},{q}value{q}:{q}{applied}{q}}},{{{q}name{q}:{q}OPENAI_API_KEY{q},{q}valueFrom{q}:{{{q}secretKeyRef{q}:{{{q}key{q}:{q}token{q},{q}name{q}:{q}openai{q}}}}}}}]}}]}}}}}}}}\\n\"\n    }}\n  }}\n}}\n"
        ),
    );
    put(
        "terraform.tfstate",
        &format!(
            "{{\n  \"resources\": [\n    {{\n      \"type\": \"aws_ecs_task_definition\",\n      \"instances\": [\n        {{\n          \"attributes\": {{\n            \"container_definitions\": \"[{{{q}environment{q}:[{{{q}name{q}:{q}DB_PASSWORD{q},{q}value{q}:{q}{state}{q}}},{{{q}name{q}:{q}OPENAI_API_KEY{q},{q}value{q}:{q}<set in the console>{q}}},{{{q}name{q}:{q}MODEL_TOKEN_CHECKSUM{q},{q}value{q}:{q}9f2c4e7a1b3d5f60718293a4b5c6d7e8f9012a3b4c5d6e7f8091a2b3c4d5e6f7{q}}}],{q}essential{q}:true}}]\",\n            \"family\": \"triage\"\n          }}\n        }}\n      ]\n    }}\n  ]\n}}\n"
        ),
    );
    put(
        "gateway.log",
        &format!(
            "2026-12-07T10:00:00Z INFO POST /partners body=\"{{{q}value{q}:{q}{body}{q},{q}name{q}:{q}partner_token{q}}}\" 201\n"
        ),
    );
    assert_found(
        dir.path(),
        [
            hit("deploy.json", 6, "generic.named-secret-json", &applied),
            hit("terraform.tfstate", 8, "generic.named-secret-json", &state),
            hit(
                "gateway.log",
                1,
                "generic.named-secret-json-value-first",
                &body,
            ),
        ],
    );
}

/// Kebab-case credential names read as their snake-case forms do:
/// Spring's `client-secret` in properties under a long dotted prefix and
/// in YAML, MinIO's `secret-key`, OpenStack's `X-Auth-Token` header in an
/// HTTP log, an `access-token` setting. References are not findings.
#[test]
fn keys_under_kebab_case_names_are_found() {
    let mut rng = Rng::new();
    let dir = tempfile::tempdir().unwrap();
    let put = writer(dir.path());
    let mut key = || digit_led(&mut rng, 31);
    let (props, yaml, minio, header, setting) = (key(), key(), key(), key(), key());
    put(
        "application.properties",
        &format!(
            "server.port=8080\nspring.security.oauth2.client.registration.github.client-id=Iv1.orders\nspring.security.oauth2.client.registration.github.client-secret={props}\nspring.security.oauth2.client.registration.google.client-secret=${{GOOGLE_CLIENT_SECRET}}\nminio.secret-key={minio}\n"
        ),
    );
    put(
        "application.yml",
        &format!(
            "spring:\n  security:\n    oauth2:\n      client:\n        registration:\n          partner:\n            client-id: orders\n            client-secret: {yaml}\n"
        ),
    );
    put(
        "compute.log",
        &format!(
            "2026-12-07T10:00:00Z DEBUG > GET /v2.1/servers HTTP/1.1\n2026-12-07T10:00:00Z DEBUG > X-Auth-Token: {header}\ncurl -H \"X-Auth-Token: $OS_TOKEN\" https://compute.corp.internal:8774/v2.1/servers\n"
        ),
    );
    put(
        "deploy.yaml",
        &format!("registry:\n  access-token: {setting}\n  refresh-token: ${{REGISTRY_REFRESH}}\n"),
    );
    assert_found(
        dir.path(),
        [
            hit("application.properties", 3, "generic.api-key", &props),
            hit("application.properties", 5, "generic.api-key", &minio),
            hit("application.yml", 8, "generic.api-key", &yaml),
            hit("compute.log", 2, "generic.api-key", &header),
            hit("deploy.yaml", 2, "generic.api-key", &setting),
        ],
    );
}
