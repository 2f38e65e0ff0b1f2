//! Config files: presets parse, `--print-config` round-trips, precedence, errors name the key.
mod common;
use common::*;

fn print_config(args: &[&str]) -> toml::Table {
    let o = dpo(&[&["train", "--print-config"], args].concat());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().parse().unwrap()
}

#[test]
fn every_preset_parses_and_print_config_round_trips() {
    let dir = scratch("config-roundtrip");
    for preset in ["quickstart", "llama2-7b-orca-lora", "zephyr-7b-ultrafeedback-lora"] {
        let path = format!("configs/{preset}.toml");
        let first = print_config(&["--config", &path]);
        let written: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        for (key, value) in &written {
            let got = &first[key];
            let same = match (value, got) {
                (toml::Value::Array(items), toml::Value::String(s)) => {
                    items.iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>().join(",") == *s
                }
                (toml::Value::Integer(i), toml::Value::Float(f)) => *i as f64 == *f,
                _ => value == got,
            };
            assert!(same, "{preset}: {key} = {value} resolved as {got}");
        }
        let again_path = dir.join(format!("{preset}.toml"));
        std::fs::write(&again_path, toml::to_string(&first).unwrap()).unwrap();
        assert_eq!(print_config(&["--config", again_path.to_str().unwrap()]), first, "{preset} round-trips");
    }
}

#[test]
fn precedence_is_defaults_then_config_then_flags() {
    let r = print_config(&["--config", "configs/quickstart.toml", "--lr", "0.25"]);
    assert_eq!(r["lr"].as_float(), Some(0.25), "flag beats config file");
    assert_eq!(r["beta"].as_float(), Some(0.1), "config file value");
    assert_eq!(r["lr_scheduler"].as_str(), Some("constant"), "config file beats default (linear)");
    assert_eq!(r["grad_accum"].as_integer(), Some(1), "default");
    assert_eq!(r["warmup_ratio"].as_float(), Some(0.0), "default");
}

#[test]
fn out_of_range_values_and_unknown_keys_name_the_key() {
    let dir = scratch("config-errors");
    for (line, key) in [
        ("lora_dropout = 1.5", "lora_dropout"),
        ("batch_size = 0", "batch_size"),
        ("warmup_ratio = 2.0", "warmup_ratio"),
        ("loss = \"slic\"", "loss"),
    ] {
        let cfg = dir.join("c.toml");
        std::fs::write(&cfg, format!("model = \"m\"\ndataset = \"d\"\n{line}\n")).unwrap();
        let o = dpo(&["train", "--config", cfg.to_str().unwrap(), "--print-config"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{line}: {err}");
        assert!(err.contains(key), "{line}: {err}");
    }
    let cfg = dir.join("typo.toml");
    std::fs::write(&cfg, "model = \"m\"\ndataset = \"d\"\nlearning_rate = 1e-3\n").unwrap();
    let o = dpo(&["train", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("typo.toml:3") && err.contains("learning_rate"), "{err}");
}
