
use builtin;
use str;

set edit:completion:arg-completer[llmarch] = {|@words|
    fn spaces {|n|
        builtin:repeat $n ' ' | str:join ''
    }
    fn cand {|text desc|
        edit:complex-candidate $text &display=$text' '(spaces (- 14 (wcswidth $text)))$desc
    }
    var command = 'llmarch'
    for word $words[1..-1] {
        if (str:has-prefix $word '-') {
            break
        }
        set command = $command';'$word
    }
    var completions = [
        &'llmarch'= {
            cand -q 'No progress bars or notes on stderr (errors are still printed)'
            cand --quiet 'No progress bars or notes on stderr (errors are still printed)'
            cand -v 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --verbose 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --allow-unknown-keys 'Treat config keys llmarch does not know as warnings instead of errors'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
            cand run 'Generate once, streaming tokens to stdout, with the live KV panel on stderr'
            cand chat 'Interactive multi-turn chat with the model''s own template, the KV cache kept across turns, and a context meter after each reply'
            cand inspect 'Architecture of a model: per-layer table and parameter counts'
            cand kv-budget 'KV-cache memory and attention budget, per model, context and layer'
            cand models 'The built-in model aliases and supported families'
            cand completions 'Shell completions (also committed under completions/)'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'llmarch;run'= {
            cand -p 'The prompt text (BOS is added as the tokenizer config says)'
            cand --prompt 'The prompt text (BOS is added as the tokenizer config says)'
            cand --prompt-file 'Read the prompt from a file (`-` for stdin)'
            cand --prompt-ids 'Raw token ids instead of text, e.g. `2,651,1144`'
            cand -n 'Tokens to generate at most (default: generation_config.json''s, else 128)'
            cand --max-new-tokens 'Tokens to generate at most (default: generation_config.json''s, else 128)'
            cand --temperature '0 = greedy. Default: generation_config.json''s when it samples, else 0'
            cand --top-k 'Keep only the k most likely tokens'
            cand --top-p 'Keep the smallest set of tokens whose probability reaches p'
            cand --min-p 'Drop tokens less likely than min-p × the most likely one'
            cand --repeat-penalty '> 1 makes tokens already in the sequence less likely'
            cand --seed 'seed'
            cand --dtype 'Weight type (default on the CPU: the checkpoint''s own, e.g. bf16, read from the file without a copy; on a GPU: bf16)'
            cand --device 'Where the model runs (not with --endpoint: the server runs it)'
            cand --draft 'Speculative decoding: `ngram` (prompt lookup: the continuation of the latest earlier match of the last tokens), `mtp` (the checkpoint''s own multi-token-prediction layers), or a Gemma 4 assistant drafter (alias such as `gemma4-e2b-assistant`, Hub repo or folder). The output is the target''s either way; only the speed changes'
            cand --draft-tokens 'Tokens drafted per verify step (default: the assistant''s `num_assistant_tokens` from its generation_config.json; 4 for ngram)'
            cand --max-context 'Context limit for this run and the budget the panel compares against (default: the model''s own). A number of tokens, `k`/`m` binary suffixes allowed (128k = 131072)'
            cand --logits-out 'Write tensor `logits` [positions, vocab] f32: every prompt position, then each step'
            cand --endpoint 'An OpenAI-compatible server to generate with (vLLM, SGLang, llama.cpp''s llama-server): `http://host:port` or `.../v1` (run: /v1/completions, chat: /v1/chat/completions), or the full URL of either. MODEL still gives the architecture (config.json only, no weights): the KV panel is computed from it for the token counts the server reports'
            cand --api-key 'API key for --endpoint (default: $OPENAI_API_KEY); sent only to the endpoint, never printed'
            cand --served-model 'The model name the server serves (default: the alias''s or repo''s id, else MODEL as given): vLLM''s --served-model-name'
            cand --endpoint-timeout 'Seconds a silent server may take to connect or to send the next bytes (a long prompt''s prefill sends nothing until it ends)'
            cand --kv-dtype 'The server''s KV cache element type, for the computed KV panel (--endpoint)'
            cand --draft-logits-out 'With an assistant `--draft`: write tensor `logits` [drafted, vocab] f32, the assistant''s logits for every token it drafted, in the order drafted'
            cand --json 'Stats as one JSON object on the last stdout line'
            cand -q 'No progress bars or notes on stderr (errors are still printed)'
            cand --quiet 'No progress bars or notes on stderr (errors are still printed)'
            cand -v 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --verbose 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --allow-unknown-keys 'Treat config keys llmarch does not know as warnings instead of errors'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'llmarch;chat'= {
            cand --system 'The system prompt'
            cand --input 'Read the user messages from a file, one per line, instead of the terminal'
            cand -n 'Tokens to generate at most (default: generation_config.json''s, else 128)'
            cand --max-new-tokens 'Tokens to generate at most (default: generation_config.json''s, else 128)'
            cand --temperature '0 = greedy. Default: generation_config.json''s when it samples, else 0'
            cand --top-k 'Keep only the k most likely tokens'
            cand --top-p 'Keep the smallest set of tokens whose probability reaches p'
            cand --min-p 'Drop tokens less likely than min-p × the most likely one'
            cand --repeat-penalty '> 1 makes tokens already in the sequence less likely'
            cand --seed 'seed'
            cand --dtype 'Weight type (default on the CPU: the checkpoint''s own, e.g. bf16, read from the file without a copy; on a GPU: bf16)'
            cand --device 'Where the model runs (not with --endpoint: the server runs it)'
            cand --draft 'Speculative decoding: `ngram` (prompt lookup: the continuation of the latest earlier match of the last tokens), `mtp` (the checkpoint''s own multi-token-prediction layers), or a Gemma 4 assistant drafter (alias such as `gemma4-e2b-assistant`, Hub repo or folder). The output is the target''s either way; only the speed changes'
            cand --draft-tokens 'Tokens drafted per verify step (default: the assistant''s `num_assistant_tokens` from its generation_config.json; 4 for ngram)'
            cand --max-context 'Context limit of the conversation (default: the model''s own). A number of tokens, `k`/`m` binary suffixes allowed (128k = 131072)'
            cand --thinking '`enable_thinking` for templates that take it (default: the template''s own)'
            cand --chat-template 'A chat template file, or a built-in one by name (`gemma-4-E2B-it`, `gemma-4-31B-it`, `Qwen3.6-27B`, `Laguna-XS.2`), instead of the model''s own'
            cand --snapshots 'KV-cache snapshots kept at turn boundaries for /undo, /regen and templates that rewrite earlier turns (each holds a copy of the cache as it was)'
            cand --endpoint 'An OpenAI-compatible server to generate with (vLLM, SGLang, llama.cpp''s llama-server): `http://host:port` or `.../v1` (run: /v1/completions, chat: /v1/chat/completions), or the full URL of either. MODEL still gives the architecture (config.json only, no weights): the KV panel is computed from it for the token counts the server reports'
            cand --api-key 'API key for --endpoint (default: $OPENAI_API_KEY); sent only to the endpoint, never printed'
            cand --served-model 'The model name the server serves (default: the alias''s or repo''s id, else MODEL as given): vLLM''s --served-model-name'
            cand --endpoint-timeout 'Seconds a silent server may take to connect or to send the next bytes (a long prompt''s prefill sends nothing until it ends)'
            cand --kv-dtype 'The server''s KV cache element type, for the computed KV panel (--endpoint)'
            cand --context-shift 'When the context is full, drop the oldest turns instead of stopping'
            cand --hide-thinking 'Do not show the model''s thinking (it is still kept in the transcript)'
            cand --no-history 'Do not read or write the input history file'
            cand -q 'No progress bars or notes on stderr (errors are still printed)'
            cand --quiet 'No progress bars or notes on stderr (errors are still printed)'
            cand -v 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --verbose 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --allow-unknown-keys 'Treat config keys llmarch does not know as warnings instead of errors'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'llmarch;inspect'= {
            cand --draft 'Also describe a drafter for this model (`ngram`, or a Gemma 4 assistant: alias, Hub repo or folder): what it reads of the target''s cache, and its own KV (none)'
            cand --json 'Machine-readable output on stdout'
            cand -q 'No progress bars or notes on stderr (errors are still printed)'
            cand --quiet 'No progress bars or notes on stderr (errors are still printed)'
            cand -v 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --verbose 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --allow-unknown-keys 'Treat config keys llmarch does not know as warnings instead of errors'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'llmarch;kv-budget'= {
            cand -c 'Context lengths: a comma-separated list of numbers with an optional k/m suffix (binary: 128k = 131072, 1m = 1048576)'
            cand --context 'Context lengths: a comma-separated list of numbers with an optional k/m suffix (binary: 128k = 131072, 1m = 1048576)'
            cand --kv-dtype 'Element type of the cached keys and values. States that the config keeps in f32 stay f32'
            cand --batch 'Sequences cached at once (1 to 1048576)'
            cand --gpu 'GPUs for --fit: NAME[:N[xNODES]] (`h200:8`, `a100-80g:4x2` = 4 per node × 2 nodes) or a memory size (`96GiB:4`, `80GB`). Names: h100 (h100-80g), h100-nvl, h200, b200, a100-40g, a100-80g, l40s, l4, rtx4090, rtx5090, rtx6000-ada, mi300x, mi325x, with the memory the driver reports (AMD: nominal)'
            cand --engine 'The engine whose plan --fit makes'
            cand --weights 'The format the engine holds the weights in (--fit). Embedding tables and the output head stay bf16 in the quantized formats'
            cand --tp 'Pin the tensor-parallel size (--fit); default: the largest the model and a node take'
            cand --pp 'Pin the pipeline-parallel size (--fit); default: the GPUs TP leaves'
            cand --mem-fraction 'The engine''s share of each GPU (--fit): vLLM''s --gpu-memory-utilization (default 0.9), SGLang''s --mem-fraction-static (default 0.85 here; SGLang picks its own at start)'
            cand --headroom 'Activation headroom per GPU (--fit): a size such as 2GiB or 500MB'
            cand --draft 'With one model: a drafter for it (`ngram`, or a Gemma 4 assistant: alias, Hub repo or folder); its own KV (none: it reads the target''s) is added to each figure'
            cand --per-layer 'One row per layer (identical neighbours folded) with bytes and attention FLOPs'
            cand --explain 'Show the formula with the numbers filled in, for one layer of each kind'
            cand --json 'Machine-readable output on stdout: an array, one object per model and context'
            cand --fit 'Plan serving on --gpu with vLLM or SGLang: whether each model fits at each context × --batch, with which split (tensor, pipeline, expert parallel), weights, KV and headroom per GPU, and the largest context and batch that fit'
            cand -q 'No progress bars or notes on stderr (errors are still printed)'
            cand --quiet 'No progress bars or notes on stderr (errors are still printed)'
            cand -v 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --verbose 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --allow-unknown-keys 'Treat config keys llmarch does not know as warnings instead of errors'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'llmarch;models'= {
            cand --json 'Machine-readable output on stdout'
            cand -q 'No progress bars or notes on stderr (errors are still printed)'
            cand --quiet 'No progress bars or notes on stderr (errors are still printed)'
            cand -v 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --verbose 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --allow-unknown-keys 'Treat config keys llmarch does not know as warnings instead of errors'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'llmarch;completions'= {
            cand -q 'No progress bars or notes on stderr (errors are still printed)'
            cand --quiet 'No progress bars or notes on stderr (errors are still printed)'
            cand -v 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --verbose 'More detail on stderr: e.g. every checkpoint tensor the model never reads'
            cand --allow-unknown-keys 'Treat config keys llmarch does not know as warnings instead of errors'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
        }
        &'llmarch;help'= {
            cand run 'Generate once, streaming tokens to stdout, with the live KV panel on stderr'
            cand chat 'Interactive multi-turn chat with the model''s own template, the KV cache kept across turns, and a context meter after each reply'
            cand inspect 'Architecture of a model: per-layer table and parameter counts'
            cand kv-budget 'KV-cache memory and attention budget, per model, context and layer'
            cand models 'The built-in model aliases and supported families'
            cand completions 'Shell completions (also committed under completions/)'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'llmarch;help;run'= {
        }
        &'llmarch;help;chat'= {
        }
        &'llmarch;help;inspect'= {
        }
        &'llmarch;help;kv-budget'= {
        }
        &'llmarch;help;models'= {
        }
        &'llmarch;help;completions'= {
        }
        &'llmarch;help;help'= {
        }
    ]
    $completions[$command]
}
