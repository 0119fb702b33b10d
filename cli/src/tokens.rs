//! `ferry token create|list|revoke`: operator bearer tokens, kept by
//! registry-svc. A new token is printed once (stdout, alone on its line, so
//! that scripts can capture it); registry keeps only its hash.

use anyhow::{anyhow, Result};
use ferry_proto::registry::v1 as pb;
use serde_json::json;

use crate::args::{Output, TokenCommand, TokenRole};
use crate::commands::{client, print, status};
use crate::output::{self, table};

fn role(r: TokenRole) -> pb::Role {
    match r {
        TokenRole::Reader => pb::Role::Reader,
        TokenRole::Operator => pb::Role::Operator,
        TokenRole::Admin => pb::Role::Admin,
    }
}

/// The line that goes with a new token.
const SHOWN_ONCE: &str =
    "This token is not shown again: store it now (registry keeps only its hash).";

pub async fn run(url: &str, out: Output, command: TokenCommand) -> Result<()> {
    let mut c = client(url)?;
    let err = status(url);
    match command {
        TokenCommand::Create { name, role: r } => {
            let created = c
                .create_token(pb::CreateTokenRequest {
                    name,
                    role: role(r) as i32,
                })
                .await
                .map_err(&err)?
                .into_inner();
            let info = created
                .info
                .ok_or_else(|| anyhow!("registry answered without the token's details"))?;
            match out {
                Output::Json => {
                    let mut value = output::token_json(&info);
                    value["token"] = json!(created.token);
                    value["note"] = json!(SHOWN_ONCE);
                    println!("{value:#}");
                }
                Output::Table => {
                    eprintln!(
                        "Created token {:?} with role {}:",
                        info.name,
                        output::token_role(info.role).to_lowercase()
                    );
                    println!("{}", created.token);
                    eprintln!("{SHOWN_ONCE}");
                }
            }
        }
        TokenCommand::List => {
            let tokens = c
                .list_tokens(pb::ListTokensRequest {})
                .await
                .map_err(&err)?
                .into_inner()
                .tokens;
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        output::token_role(t.role).to_lowercase(),
                        output::time(&t.created_at),
                    ]
                })
                .collect();
            print(
                out,
                json!(tokens.iter().map(output::token_json).collect::<Vec<_>>()),
                table(&["NAME", "ROLE", "CREATED"], &rows),
            );
        }
        TokenCommand::Revoke { name } => {
            c.revoke_token(pb::RevokeTokenRequest { name: name.clone() })
                .await
                .map_err(&err)?;
            print(
                out,
                json!({"revoked": name}),
                format!("revoked token {name}; it no longer authenticates"),
            );
        }
    }
    Ok(())
}
