
using namespace System.Management.Automation
using namespace System.Management.Automation.Language

Register-ArgumentCompleter -Native -CommandName 'llmarch' -ScriptBlock {
    param($wordToComplete, $commandAst, $cursorPosition)

    $commandElements = $commandAst.CommandElements
    $command = @(
        'llmarch'
        for ($i = 1; $i -lt $commandElements.Count; $i++) {
            $element = $commandElements[$i]
            if ($element -isnot [StringConstantExpressionAst] -or
                $element.StringConstantType -ne [StringConstantType]::BareWord -or
                $element.Value.StartsWith('-') -or
                $element.Value -eq $wordToComplete) {
                break
        }
        $element.Value
    }) -join ';'

    $completions = @(switch ($command) {
        'llmarch' {
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--allow-unknown-keys', '--allow-unknown-keys', [CompletionResultType]::ParameterName, 'Treat config keys llmarch does not know as warnings instead of errors')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('run', 'run', [CompletionResultType]::ParameterValue, 'Generate once, streaming tokens to stdout, with the live KV panel on stderr')
            [CompletionResult]::new('chat', 'chat', [CompletionResultType]::ParameterValue, 'Interactive multi-turn chat with the model''s own template, the KV cache kept across turns, and a context meter after each reply')
            [CompletionResult]::new('inspect', 'inspect', [CompletionResultType]::ParameterValue, 'Architecture of a model: per-layer table and parameter counts')
            [CompletionResult]::new('kv-budget', 'kv-budget', [CompletionResultType]::ParameterValue, 'KV-cache memory and attention budget, per model, context and layer')
            [CompletionResult]::new('models', 'models', [CompletionResultType]::ParameterValue, 'The built-in model aliases and supported families')
            [CompletionResult]::new('completions', 'completions', [CompletionResultType]::ParameterValue, 'Shell completions (also committed under completions/)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'llmarch;run' {
            [CompletionResult]::new('-p', '-p', [CompletionResultType]::ParameterName, 'The prompt text (BOS is added as the tokenizer config says)')
            [CompletionResult]::new('--prompt', '--prompt', [CompletionResultType]::ParameterName, 'The prompt text (BOS is added as the tokenizer config says)')
            [CompletionResult]::new('--prompt-file', '--prompt-file', [CompletionResultType]::ParameterName, 'Read the prompt from a file (`-` for stdin)')
            [CompletionResult]::new('--prompt-ids', '--prompt-ids', [CompletionResultType]::ParameterName, 'Raw token ids instead of text, e.g. `2,651,1144`')
            [CompletionResult]::new('-n', '-n', [CompletionResultType]::ParameterName, 'Tokens to generate at most (default: generation_config.json''s, else 128)')
            [CompletionResult]::new('--max-new-tokens', '--max-new-tokens', [CompletionResultType]::ParameterName, 'Tokens to generate at most (default: generation_config.json''s, else 128)')
            [CompletionResult]::new('--temperature', '--temperature', [CompletionResultType]::ParameterName, '0 = greedy. Default: generation_config.json''s when it samples, else 0')
            [CompletionResult]::new('--top-k', '--top-k', [CompletionResultType]::ParameterName, 'Keep only the k most likely tokens')
            [CompletionResult]::new('--top-p', '--top-p', [CompletionResultType]::ParameterName, 'Keep the smallest set of tokens whose probability reaches p')
            [CompletionResult]::new('--min-p', '--min-p', [CompletionResultType]::ParameterName, 'Drop tokens less likely than min-p × the most likely one')
            [CompletionResult]::new('--repeat-penalty', '--repeat-penalty', [CompletionResultType]::ParameterName, '> 1 makes tokens already in the sequence less likely')
            [CompletionResult]::new('--seed', '--seed', [CompletionResultType]::ParameterName, 'seed')
            [CompletionResult]::new('--dtype', '--dtype', [CompletionResultType]::ParameterName, 'Weight type (default on the CPU: the checkpoint''s own, e.g. bf16, read from the file without a copy; on a GPU: bf16)')
            [CompletionResult]::new('--device', '--device', [CompletionResultType]::ParameterName, 'Where the model runs (not with --endpoint: the server runs it)')
            [CompletionResult]::new('--draft', '--draft', [CompletionResultType]::ParameterName, 'Speculative decoding: `ngram` (prompt lookup: the continuation of the latest earlier match of the last tokens), `mtp` (the checkpoint''s own multi-token-prediction layers), or a Gemma 4 assistant drafter (alias such as `gemma4-e2b-assistant`, Hub repo or folder). The output is the target''s either way; only the speed changes')
            [CompletionResult]::new('--draft-tokens', '--draft-tokens', [CompletionResultType]::ParameterName, 'Tokens drafted per verify step (default: the assistant''s `num_assistant_tokens` from its generation_config.json; 4 for ngram)')
            [CompletionResult]::new('--max-context', '--max-context', [CompletionResultType]::ParameterName, 'Context limit for this run and the budget the panel compares against (default: the model''s own). A number of tokens, `k`/`m` binary suffixes allowed (128k = 131072)')
            [CompletionResult]::new('--logits-out', '--logits-out', [CompletionResultType]::ParameterName, 'Write tensor `logits` [positions, vocab] f32: every prompt position, then each step')
            [CompletionResult]::new('--endpoint', '--endpoint', [CompletionResultType]::ParameterName, 'An OpenAI-compatible server to generate with (vLLM, SGLang, llama.cpp''s llama-server): `http://host:port` or `.../v1` (run: /v1/completions, chat: /v1/chat/completions), or the full URL of either. MODEL still gives the architecture (config.json only, no weights): the KV panel is computed from it for the token counts the server reports')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'API key for --endpoint (default: $OPENAI_API_KEY); sent only to the endpoint, never printed')
            [CompletionResult]::new('--served-model', '--served-model', [CompletionResultType]::ParameterName, 'The model name the server serves (default: the alias''s or repo''s id, else MODEL as given): vLLM''s --served-model-name')
            [CompletionResult]::new('--endpoint-timeout', '--endpoint-timeout', [CompletionResultType]::ParameterName, 'Seconds a silent server may take to connect or to send the next bytes (a long prompt''s prefill sends nothing until it ends)')
            [CompletionResult]::new('--kv-dtype', '--kv-dtype', [CompletionResultType]::ParameterName, 'The server''s KV cache element type, for the computed KV panel (--endpoint)')
            [CompletionResult]::new('--draft-logits-out', '--draft-logits-out', [CompletionResultType]::ParameterName, 'With an assistant `--draft`: write tensor `logits` [drafted, vocab] f32, the assistant''s logits for every token it drafted, in the order drafted')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Stats as one JSON object on the last stdout line')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--allow-unknown-keys', '--allow-unknown-keys', [CompletionResultType]::ParameterName, 'Treat config keys llmarch does not know as warnings instead of errors')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'llmarch;chat' {
            [CompletionResult]::new('--system', '--system', [CompletionResultType]::ParameterName, 'The system prompt')
            [CompletionResult]::new('--input', '--input', [CompletionResultType]::ParameterName, 'Read the user messages from a file, one per line, instead of the terminal')
            [CompletionResult]::new('-n', '-n', [CompletionResultType]::ParameterName, 'Tokens to generate at most (default: generation_config.json''s, else 128)')
            [CompletionResult]::new('--max-new-tokens', '--max-new-tokens', [CompletionResultType]::ParameterName, 'Tokens to generate at most (default: generation_config.json''s, else 128)')
            [CompletionResult]::new('--temperature', '--temperature', [CompletionResultType]::ParameterName, '0 = greedy. Default: generation_config.json''s when it samples, else 0')
            [CompletionResult]::new('--top-k', '--top-k', [CompletionResultType]::ParameterName, 'Keep only the k most likely tokens')
            [CompletionResult]::new('--top-p', '--top-p', [CompletionResultType]::ParameterName, 'Keep the smallest set of tokens whose probability reaches p')
            [CompletionResult]::new('--min-p', '--min-p', [CompletionResultType]::ParameterName, 'Drop tokens less likely than min-p × the most likely one')
            [CompletionResult]::new('--repeat-penalty', '--repeat-penalty', [CompletionResultType]::ParameterName, '> 1 makes tokens already in the sequence less likely')
            [CompletionResult]::new('--seed', '--seed', [CompletionResultType]::ParameterName, 'seed')
            [CompletionResult]::new('--dtype', '--dtype', [CompletionResultType]::ParameterName, 'Weight type (default on the CPU: the checkpoint''s own, e.g. bf16, read from the file without a copy; on a GPU: bf16)')
            [CompletionResult]::new('--device', '--device', [CompletionResultType]::ParameterName, 'Where the model runs (not with --endpoint: the server runs it)')
            [CompletionResult]::new('--draft', '--draft', [CompletionResultType]::ParameterName, 'Speculative decoding: `ngram` (prompt lookup: the continuation of the latest earlier match of the last tokens), `mtp` (the checkpoint''s own multi-token-prediction layers), or a Gemma 4 assistant drafter (alias such as `gemma4-e2b-assistant`, Hub repo or folder). The output is the target''s either way; only the speed changes')
            [CompletionResult]::new('--draft-tokens', '--draft-tokens', [CompletionResultType]::ParameterName, 'Tokens drafted per verify step (default: the assistant''s `num_assistant_tokens` from its generation_config.json; 4 for ngram)')
            [CompletionResult]::new('--max-context', '--max-context', [CompletionResultType]::ParameterName, 'Context limit of the conversation (default: the model''s own). A number of tokens, `k`/`m` binary suffixes allowed (128k = 131072)')
            [CompletionResult]::new('--thinking', '--thinking', [CompletionResultType]::ParameterName, '`enable_thinking` for templates that take it (default: the template''s own)')
            [CompletionResult]::new('--chat-template', '--chat-template', [CompletionResultType]::ParameterName, 'A chat template file, or a built-in one by name (`gemma-4-E2B-it`, `gemma-4-31B-it`, `Qwen3.6-27B`, `Laguna-XS.2`), instead of the model''s own')
            [CompletionResult]::new('--snapshots', '--snapshots', [CompletionResultType]::ParameterName, 'KV-cache snapshots kept at turn boundaries for /undo, /regen and templates that rewrite earlier turns (each holds a copy of the cache as it was)')
            [CompletionResult]::new('--endpoint', '--endpoint', [CompletionResultType]::ParameterName, 'An OpenAI-compatible server to generate with (vLLM, SGLang, llama.cpp''s llama-server): `http://host:port` or `.../v1` (run: /v1/completions, chat: /v1/chat/completions), or the full URL of either. MODEL still gives the architecture (config.json only, no weights): the KV panel is computed from it for the token counts the server reports')
            [CompletionResult]::new('--api-key', '--api-key', [CompletionResultType]::ParameterName, 'API key for --endpoint (default: $OPENAI_API_KEY); sent only to the endpoint, never printed')
            [CompletionResult]::new('--served-model', '--served-model', [CompletionResultType]::ParameterName, 'The model name the server serves (default: the alias''s or repo''s id, else MODEL as given): vLLM''s --served-model-name')
            [CompletionResult]::new('--endpoint-timeout', '--endpoint-timeout', [CompletionResultType]::ParameterName, 'Seconds a silent server may take to connect or to send the next bytes (a long prompt''s prefill sends nothing until it ends)')
            [CompletionResult]::new('--kv-dtype', '--kv-dtype', [CompletionResultType]::ParameterName, 'The server''s KV cache element type, for the computed KV panel (--endpoint)')
            [CompletionResult]::new('--context-shift', '--context-shift', [CompletionResultType]::ParameterName, 'When the context is full, drop the oldest turns instead of stopping')
            [CompletionResult]::new('--hide-thinking', '--hide-thinking', [CompletionResultType]::ParameterName, 'Do not show the model''s thinking (it is still kept in the transcript)')
            [CompletionResult]::new('--no-history', '--no-history', [CompletionResultType]::ParameterName, 'Do not read or write the input history file')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--allow-unknown-keys', '--allow-unknown-keys', [CompletionResultType]::ParameterName, 'Treat config keys llmarch does not know as warnings instead of errors')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'llmarch;inspect' {
            [CompletionResult]::new('--draft', '--draft', [CompletionResultType]::ParameterName, 'Also describe a drafter for this model (`ngram`, or a Gemma 4 assistant: alias, Hub repo or folder): what it reads of the target''s cache, and its own KV (none)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Machine-readable output on stdout')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--allow-unknown-keys', '--allow-unknown-keys', [CompletionResultType]::ParameterName, 'Treat config keys llmarch does not know as warnings instead of errors')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'llmarch;kv-budget' {
            [CompletionResult]::new('-c', '-c', [CompletionResultType]::ParameterName, 'Context lengths: a comma-separated list of numbers with an optional k/m suffix (binary: 128k = 131072, 1m = 1048576)')
            [CompletionResult]::new('--context', '--context', [CompletionResultType]::ParameterName, 'Context lengths: a comma-separated list of numbers with an optional k/m suffix (binary: 128k = 131072, 1m = 1048576)')
            [CompletionResult]::new('--kv-dtype', '--kv-dtype', [CompletionResultType]::ParameterName, 'Element type of the cached keys and values. States that the config keeps in f32 stay f32')
            [CompletionResult]::new('--batch', '--batch', [CompletionResultType]::ParameterName, 'Sequences cached at once (1 to 1048576)')
            [CompletionResult]::new('--gpu', '--gpu', [CompletionResultType]::ParameterName, 'GPUs for --fit: NAME[:N[xNODES]] (`h200:8`, `a100-80g:4x2` = 4 per node × 2 nodes) or a memory size (`96GiB:4`, `80GB`). Names: h100 (h100-80g), h100-nvl, h200, b200, a100-40g, a100-80g, l40s, l4, rtx4090, rtx5090, rtx6000-ada, mi300x, mi325x, with the memory the driver reports (AMD: nominal)')
            [CompletionResult]::new('--engine', '--engine', [CompletionResultType]::ParameterName, 'The engine whose plan --fit makes')
            [CompletionResult]::new('--weights', '--weights', [CompletionResultType]::ParameterName, 'The format the engine holds the weights in (--fit). Embedding tables and the output head stay bf16 in the quantized formats')
            [CompletionResult]::new('--tp', '--tp', [CompletionResultType]::ParameterName, 'Pin the tensor-parallel size (--fit); default: the largest the model and a node take')
            [CompletionResult]::new('--pp', '--pp', [CompletionResultType]::ParameterName, 'Pin the pipeline-parallel size (--fit); default: the GPUs TP leaves')
            [CompletionResult]::new('--mem-fraction', '--mem-fraction', [CompletionResultType]::ParameterName, 'The engine''s share of each GPU (--fit): vLLM''s --gpu-memory-utilization (default 0.9), SGLang''s --mem-fraction-static (default 0.85 here; SGLang picks its own at start)')
            [CompletionResult]::new('--headroom', '--headroom', [CompletionResultType]::ParameterName, 'Activation headroom per GPU (--fit): a size such as 2GiB or 500MB')
            [CompletionResult]::new('--draft', '--draft', [CompletionResultType]::ParameterName, 'With one model: a drafter for it (`ngram`, or a Gemma 4 assistant: alias, Hub repo or folder); its own KV (none: it reads the target''s) is added to each figure')
            [CompletionResult]::new('--per-layer', '--per-layer', [CompletionResultType]::ParameterName, 'One row per layer (identical neighbours folded) with bytes and attention FLOPs')
            [CompletionResult]::new('--explain', '--explain', [CompletionResultType]::ParameterName, 'Show the formula with the numbers filled in, for one layer of each kind')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Machine-readable output on stdout: an array, one object per model and context')
            [CompletionResult]::new('--fit', '--fit', [CompletionResultType]::ParameterName, 'Plan serving on --gpu with vLLM or SGLang: whether each model fits at each context × --batch, with which split (tensor, pipeline, expert parallel), weights, KV and headroom per GPU, and the largest context and batch that fit')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--allow-unknown-keys', '--allow-unknown-keys', [CompletionResultType]::ParameterName, 'Treat config keys llmarch does not know as warnings instead of errors')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'llmarch;models' {
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Machine-readable output on stdout')
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--allow-unknown-keys', '--allow-unknown-keys', [CompletionResultType]::ParameterName, 'Treat config keys llmarch does not know as warnings instead of errors')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'llmarch;completions' {
            [CompletionResult]::new('-q', '-q', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('--quiet', '--quiet', [CompletionResultType]::ParameterName, 'No progress bars or notes on stderr (errors are still printed)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More detail on stderr: e.g. every checkpoint tensor the model never reads')
            [CompletionResult]::new('--allow-unknown-keys', '--allow-unknown-keys', [CompletionResultType]::ParameterName, 'Treat config keys llmarch does not know as warnings instead of errors')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'llmarch;help' {
            [CompletionResult]::new('run', 'run', [CompletionResultType]::ParameterValue, 'Generate once, streaming tokens to stdout, with the live KV panel on stderr')
            [CompletionResult]::new('chat', 'chat', [CompletionResultType]::ParameterValue, 'Interactive multi-turn chat with the model''s own template, the KV cache kept across turns, and a context meter after each reply')
            [CompletionResult]::new('inspect', 'inspect', [CompletionResultType]::ParameterValue, 'Architecture of a model: per-layer table and parameter counts')
            [CompletionResult]::new('kv-budget', 'kv-budget', [CompletionResultType]::ParameterValue, 'KV-cache memory and attention budget, per model, context and layer')
            [CompletionResult]::new('models', 'models', [CompletionResultType]::ParameterValue, 'The built-in model aliases and supported families')
            [CompletionResult]::new('completions', 'completions', [CompletionResultType]::ParameterValue, 'Shell completions (also committed under completions/)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'llmarch;help;run' {
            break
        }
        'llmarch;help;chat' {
            break
        }
        'llmarch;help;inspect' {
            break
        }
        'llmarch;help;kv-budget' {
            break
        }
        'llmarch;help;models' {
            break
        }
        'llmarch;help;completions' {
            break
        }
        'llmarch;help;help' {
            break
        }
    })

    $completions.Where{ $_.CompletionText -like "$wordToComplete*" } |
        Sort-Object -Property ListItemText
}
