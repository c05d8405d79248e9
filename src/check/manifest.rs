//! Reading Kubernetes YAML (multi-document) and finding the pods that run tidegate.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::config::Config;

/// One Kubernetes object from the input.
#[derive(Debug, Clone)]
pub(super) struct Object {
    /// Where it came from (file, or `-`).
    pub(super) source: String,
    pub(super) kind: String,
    pub(super) name: String,
    pub(super) value: Value,
}

/// How tidegate runs in a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// A second entry in `containers`.
    ClassicSidecar,
    /// An init container with `restartPolicy: Always`.
    NativeSidecar,
    /// tidegate is the entrypoint and runs the app (`-- CMD`).
    Supervisor,
}

/// A pod template (or pod) that runs tidegate.
#[derive(Debug)]
pub(super) struct TidegatePod<'a> {
    pub(super) object: &'a Object,
    /// JSON pointer of the pod spec, e.g. `/spec/template/spec`.
    pub(super) spec_path: &'static str,
    pub(super) spec: &'a Value,
    pub(super) labels: Option<&'a Value>,
    pub(super) mode: Mode,
    /// JSON pointer of the tidegate container.
    pub(super) container_path: String,
    pub(super) container: &'a Value,
    /// Its flags, parsed; `Err` holds the parse error.
    pub(super) config: Result<Config, String>,
}

/// Input that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// A file or directory cannot be read.
    #[error("{path}: cannot read")]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A document is not YAML.
    #[error("{source_name}: invalid YAML: {message}")]
    Yaml {
        /// The file.
        source_name: String,
        /// Why.
        message: String,
    },
}

/// Reads every object from `inputs` (files, directories searched for `.yaml`/`.yml`, `-`).
pub(super) fn read_inputs(inputs: &[String]) -> Result<Vec<Object>, InputError> {
    let mut objects = Vec::new();
    for input in inputs {
        if input == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|source| {
                InputError::Read {
                    path: "-".into(),
                    source,
                }
            })?;
            parse_documents("-", &text, &mut objects)?;
            continue;
        }
        let path = Path::new(input);
        let mut files = Vec::new();
        collect_files(path, &mut files)?;
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|source| InputError::Read {
                path: file.clone(),
                source,
            })?;
            parse_documents(&file.display().to_string(), &text, &mut objects)?;
        }
    }
    Ok(objects)
}

fn collect_files(path: &Path, files: &mut Vec<PathBuf>) -> Result<(), InputError> {
    let read_err = |source| InputError::Read {
        path: path.to_owned(),
        source,
    };
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(read_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for entry in entries {
            if entry.is_dir() {
                collect_files(&entry, files)?;
            } else if matches!(
                entry.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                files.push(entry);
            }
        }
        Ok(())
    } else {
        std::fs::metadata(path).map_err(read_err)?;
        files.push(path.to_owned());
        Ok(())
    }
}

pub(super) fn parse_documents(
    source: &str,
    text: &str,
    objects: &mut Vec<Object>,
) -> Result<(), InputError> {
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(document).map_err(|e| InputError::Yaml {
            source_name: source.to_owned(),
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        if kind == "List" {
            for item in value["items"].as_array().into_iter().flatten() {
                push(source, item.clone(), objects);
            }
        } else {
            push(source, value, objects);
        }
    }
    Ok(())
}

fn push(source: &str, value: Value, objects: &mut Vec<Object>) {
    objects.push(Object {
        source: source.to_owned(),
        kind: value["kind"].as_str().unwrap_or_default().to_owned(),
        name: value["metadata"]["name"]
            .as_str()
            .unwrap_or("(unnamed)")
            .to_owned(),
        value,
    });
}

/// The pods in `objects` that run tidegate.
pub(super) fn tidegate_pods(objects: &[Object]) -> Vec<TidegatePod<'_>> {
    let mut pods = Vec::new();
    for object in objects {
        let (spec_path, labels_path) = match object.kind.as_str() {
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => {
                ("/spec/template/spec", "/spec/template/metadata/labels")
            }
            "Pod" => ("/spec", "/metadata/labels"),
            _ => continue,
        };
        let Some(spec) = object.value.pointer(spec_path) else {
            continue;
        };
        let labels = object.value.pointer(labels_path);
        for (list, native_allowed) in [("containers", false), ("initContainers", true)] {
            for (i, container) in spec[list].as_array().into_iter().flatten().enumerate() {
                if !is_tidegate(container) {
                    continue;
                }
                let argv = argv(container);
                let supervisor = argv.iter().any(|a| a == "--");
                let mode = if supervisor {
                    Mode::Supervisor
                } else if native_allowed {
                    // Without restartPolicy: Always it is a plain init container, reported by
                    // the `init-container` rule.
                    Mode::NativeSidecar
                } else {
                    Mode::ClassicSidecar
                };
                pods.push(TidegatePod {
                    object,
                    spec_path,
                    spec,
                    labels,
                    mode,
                    container_path: format!("{spec_path}/{list}/{i}"),
                    container,
                    config: parse_flags(container, &argv),
                });
            }
        }
    }
    pods
}

fn is_tidegate(container: &Value) -> bool {
    let image = container["image"].as_str().unwrap_or_default();
    let image_name = image.rsplit('/').next().unwrap_or_default();
    let command0 = container["command"][0].as_str().unwrap_or_default();
    image_name.starts_with("tidegate") || command0.ends_with("tidegate")
}

/// The container's arguments after the program name: `command[1..] + args`, or `args`.
fn argv(container: &Value) -> Vec<String> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let command = strings(&container["command"]);
    let mut argv: Vec<String> = command.into_iter().skip(1).collect();
    argv.extend(strings(&container["args"]));
    argv
}

/// Parses the container's flags and `TIDEGATE_*` environment the way tidegate would, without
/// looking at this process's environment or any file.
fn parse_flags(container: &Value, argv: &[String]) -> Result<Config, String> {
    let command = crate::config::command(false);
    let mut full = vec!["tidegate".to_owned()];
    let (flags, child) = match argv.iter().position(|a| a == "--") {
        Some(i) => (&argv[..i], &argv[i..]),
        None => (argv, &argv[argv.len()..]),
    };
    // A flag on the command line wins over its environment variable.
    let given: Vec<&str> = flags
        .iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a))
        .collect();
    for env in container["env"].as_array().into_iter().flatten() {
        let Some(name) = env["name"].as_str() else {
            continue;
        };
        // Values from a Secret or ConfigMap are unknown here; the admin token's mere presence
        // matters to the rules, so it gets a placeholder.
        let value = match env["value"].as_str() {
            Some(value) => value,
            None if name == "TIDEGATE_ADMIN_TOKEN" && !env["valueFrom"].is_null() => "from-secret",
            None => continue,
        };
        let Some(flag) = name.strip_prefix("TIDEGATE_") else {
            continue;
        };
        let flag = flag.to_ascii_lowercase().replace('_', "-");
        if given.contains(&flag.as_str()) {
            continue;
        }
        let is_switch = command
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()))
            .is_some_and(|a| matches!(a.get_action(), clap::ArgAction::SetTrue));
        if is_switch {
            if matches!(value, "true" | "1" | "yes" | "on") {
                full.push(format!("--{flag}"));
            }
        } else {
            full.push(format!("--{flag}={value}"));
        }
    }
    full.extend(flags.iter().cloned());
    full.extend(child.iter().cloned());
    // A --config file lives in a ConfigMap we cannot see: check the flags without it.
    let mut skip_next = false;
    let full: Vec<String> = full
        .into_iter()
        .filter(|a| {
            if skip_next {
                skip_next = false;
                return false;
            }
            if a == "--config" {
                skip_next = true;
                return false;
            }
            !a.starts_with("--config=")
        })
        .collect();
    Config::without_env(full).map_err(|e| e.to_string())
}
