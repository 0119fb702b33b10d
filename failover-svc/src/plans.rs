//! Recovery plans as failover-svc keeps them: an ordered list of groups,
//! each of protected VMs and replication groups, with actions before and
//! after it (scripts from `[failover] plan_scripts_dir`, and manual steps
//! a person confirms). Stored in sled by name; a plan job runs them
//! (`plan_run`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::ids::{check_name, UnixNanos, VmName};
use ferry_runtime::Refused;
use serde::{Deserialize, Serialize};

use crate::error::FailoverError;

type Result<T> = std::result::Result<T, FailoverError>;

/// A script action's bound when it names none.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// What an action does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// A file of the scripts directory, run with the plan's context.
    Script { script: String, timeout_secs: u32 },
    /// A person's step: the job waits until resumed.
    Manual { text: String },
}

/// An action before or after a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub name: String,
    pub kind: ActionKind,
}

impl Action {
    /// A script action's bound.
    pub fn timeout(&self) -> Duration {
        match &self.kind {
            ActionKind::Script { timeout_secs, .. } if *timeout_secs > 0 => {
                Duration::from_secs(u64::from(*timeout_secs))
            }
            _ => SCRIPT_TIMEOUT,
        }
    }
}

/// Before or after a group's VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    Pre,
    Post,
}

impl When {
    pub fn tag(self) -> &'static str {
        match self {
            When::Pre => "pre",
            When::Post => "post",
        }
    }
}

/// One group of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanGroup {
    pub vms: Vec<VmName>,
    pub replication_groups: Vec<String>,
    pub pre: Vec<Action>,
    pub post: Vec<Action>,
}

/// A recovery plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub groups: Vec<PlanGroup>,
    pub created_nanos: UnixNanos,
}

impl Plan {
    /// Which group (1-based) holds `vm` directly, if any.
    pub fn group_of(&self, vm: &str) -> Option<usize> {
        self.groups
            .iter()
            .position(|g| g.vms.iter().any(|v| v.as_str() == vm))
            .map(|i| i + 1)
    }

    /// Which group (1-based) holds replication group `group`, if any.
    pub fn group_of_replication_group(&self, group: &str) -> Option<usize> {
        self.groups
            .iter()
            .position(|g| g.replication_groups.iter().any(|r| r == group))
            .map(|i| i + 1)
    }
}

/// The plans, in failover-svc's database.
pub struct Plans {
    db: sled::Db,
    tree: sled::Tree,
    scripts: PathBuf,
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| FailoverError::Corrupt(e.to_string()))
}

fn unknown(name: &str) -> FailoverError {
    Refused::not_found(format!(
        "recovery plan {name:?} does not exist (ferry plan list)"
    ))
    .into()
}

impl Plans {
    /// The plans in `db`; script actions run files of `scripts`.
    pub fn open(db: &sled::Db, scripts: &Path) -> Result<Plans> {
        Ok(Plans {
            db: db.clone(),
            tree: db.open_tree("plans")?,
            scripts: scripts.to_path_buf(),
        })
    }

    /// Where a script action's file is: a plain file name inside the
    /// scripts directory, nothing else.
    pub fn script_path(&self, script: &str) -> Result<PathBuf> {
        if script.is_empty()
            || script.contains('/')
            || script.contains('\0')
            || script == "."
            || script == ".."
        {
            return Err(Refused::invalid_argument(format!(
                "script {script:?} must be a file name in failover-svc's plan scripts directory \
                 ({}), with no '/'",
                self.scripts.display()
            ))
            .into());
        }
        Ok(self.scripts.join(script))
    }

    pub fn get(&self, name: &str) -> Result<Plan> {
        match self.tree.get(name.as_bytes())? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| {
                FailoverError::Corrupt(format!("recovery plan {name:?} is damaged: {e}"))
            }),
            None => Err(unknown(name)),
        }
    }

    pub fn list(&self) -> Result<Vec<Plan>> {
        let mut out = Vec::new();
        for kv in self.tree.iter() {
            let (_, v) = kv?;
            out.push(
                serde_json::from_slice(&v)
                    .map_err(|e| FailoverError::Corrupt(format!("a recovery plan: {e}")))?,
            );
        }
        Ok(out)
    }

    fn put(&self, plan: &Plan) -> Result<()> {
        self.tree.insert(plan.name.as_bytes(), json(plan)?)?;
        self.db.flush()?;
        Ok(())
    }

    /// A new, empty plan; ALREADY_EXISTS if the name is taken.
    pub fn create(&self, name: &str) -> Result<Plan> {
        check_name("plan name", name).map_err(|e| Refused::invalid_argument(e.0))?;
        let plan = Plan {
            name: name.to_string(),
            groups: Vec::new(),
            created_nanos: UnixNanos::now(),
        };
        let taken =
            self.tree
                .compare_and_swap(name.as_bytes(), None::<&[u8]>, Some(json(&plan)?))?;
        if taken.is_err() {
            return Err(Refused::already_exists(format!("recovery plan {name:?} exists")).into());
        }
        self.db.flush()?;
        Ok(plan)
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        if self.tree.remove(name.as_bytes())?.is_none() {
            return Err(unknown(name));
        }
        self.db.flush()?;
        Ok(())
    }

    /// Appends `group` (checked by the caller against registry) to the
    /// plan; a VM or replication group already in the plan is refused.
    pub fn add_group(&self, name: &str, group: PlanGroup) -> Result<Plan> {
        let mut plan = self.get(name)?;
        if group.vms.is_empty() && group.replication_groups.is_empty() {
            return Err(Refused::invalid_argument(
                "a group needs at least one VM or replication group",
            )
            .into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for vm in &group.vms {
            if let Some(g) = plan.group_of(vm.as_str()) {
                return Err(Refused::invalid_argument(format!(
                    "VM \"{vm}\" is already in group {g} of plan {name:?}; a VM is in one group \
                     of a plan"
                ))
                .into());
            }
            if !seen.insert(vm.as_str()) {
                return Err(
                    Refused::invalid_argument(format!("VM \"{vm}\" is named twice")).into(),
                );
            }
        }
        for r in &group.replication_groups {
            if let Some(g) = plan.group_of_replication_group(r) {
                return Err(Refused::invalid_argument(format!(
                    "replication group {r:?} is already in group {g} of plan {name:?}"
                ))
                .into());
            }
            if !seen.insert(r.as_str()) {
                return Err(Refused::invalid_argument(format!(
                    "replication group {r:?} is named twice"
                ))
                .into());
            }
        }
        plan.groups.push(group);
        self.put(&plan)?;
        Ok(plan)
    }

    /// Adds `action` before or after group `index` (1-based).
    pub fn add_action(&self, name: &str, index: usize, when: When, action: Action) -> Result<Plan> {
        let mut plan = self.get(name)?;
        let count = plan.groups.len();
        let group = index
            .checked_sub(1)
            .and_then(|i| plan.groups.get_mut(i))
            .ok_or_else(|| {
                Refused::invalid_argument(format!(
                    "plan {name:?} has {count} group(s); group {index} is not one of them"
                ))
            })?;
        check_name("action name", &action.name).map_err(|e| Refused::invalid_argument(e.0))?;
        if group
            .pre
            .iter()
            .chain(group.post.iter())
            .any(|a| a.name == action.name)
        {
            return Err(Refused::already_exists(format!(
                "group {index} of plan {name:?} has an action {:?}",
                action.name
            ))
            .into());
        }
        match &action.kind {
            ActionKind::Script { script, .. } => {
                self.script_path(script)?;
            }
            ActionKind::Manual { text } if text.trim().is_empty() => {
                return Err(Refused::invalid_argument(
                    "a manual action needs the text a person acts on",
                )
                .into())
            }
            ActionKind::Manual { .. } => {}
        }
        match when {
            When::Pre => group.pre.push(action),
            When::Post => group.post.push(action),
        }
        self.put(&plan)?;
        Ok(plan)
    }
}
