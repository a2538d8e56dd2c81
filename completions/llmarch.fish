# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_llmarch_global_optspecs
    string join \n q/quiet allow-unknown-keys h/help V/version
end

function __fish_llmarch_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_llmarch_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_llmarch_using_subcommand
    set -l cmd (__fish_llmarch_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c llmarch -n "__fish_llmarch_needs_command" -s q -l quiet -d 'No progress bars or notes on stderr (errors are still printed)'
complete -c llmarch -n "__fish_llmarch_needs_command" -l allow-unknown-keys -d 'Treat config keys llmarch does not know as warnings instead of errors'
complete -c llmarch -n "__fish_llmarch_needs_command" -s h -l help -d 'Print help'
complete -c llmarch -n "__fish_llmarch_needs_command" -s V -l version -d 'Print version'
complete -c llmarch -n "__fish_llmarch_needs_command" -f -a "inspect" -d 'Architecture of a model: per-layer table and parameter counts'
complete -c llmarch -n "__fish_llmarch_needs_command" -f -a "kv-budget" -d 'KV-cache memory and attention budget, per model, context and layer'
complete -c llmarch -n "__fish_llmarch_needs_command" -f -a "models" -d 'The built-in model aliases and supported families'
complete -c llmarch -n "__fish_llmarch_needs_command" -f -a "completions" -d 'Shell completions (also committed under completions/)'
complete -c llmarch -n "__fish_llmarch_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c llmarch -n "__fish_llmarch_using_subcommand inspect" -l json -d 'Machine-readable output on stdout'
complete -c llmarch -n "__fish_llmarch_using_subcommand inspect" -s q -l quiet -d 'No progress bars or notes on stderr (errors are still printed)'
complete -c llmarch -n "__fish_llmarch_using_subcommand inspect" -l allow-unknown-keys -d 'Treat config keys llmarch does not know as warnings instead of errors'
complete -c llmarch -n "__fish_llmarch_using_subcommand inspect" -s h -l help -d 'Print help'
complete -c llmarch -n "__fish_llmarch_using_subcommand inspect" -s V -l version -d 'Print version'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -s c -l context -d 'Context lengths: a comma-separated list of numbers with an optional k/m suffix (binary: 128k = 131072, 1m = 1048576)' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l kv-dtype -d 'Element type of the cached keys and values. States that the config keeps in f32 stay f32' -r -f -a "f32\t''
bf16\t''
f16\t''
q8_0\t''
q4_0\t''"
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l batch -d 'Sequences cached at once' -r
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l per-layer -d 'One row per layer (identical neighbours folded) with bytes and attention FLOPs'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l explain -d 'Show the formula with the numbers filled in, for one layer of each kind'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l json -d 'Machine-readable output on stdout: an array, one object per model and context'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -s q -l quiet -d 'No progress bars or notes on stderr (errors are still printed)'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -l allow-unknown-keys -d 'Treat config keys llmarch does not know as warnings instead of errors'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -s h -l help -d 'Print help'
complete -c llmarch -n "__fish_llmarch_using_subcommand kv-budget" -s V -l version -d 'Print version'
complete -c llmarch -n "__fish_llmarch_using_subcommand models" -l json -d 'Machine-readable output on stdout'
complete -c llmarch -n "__fish_llmarch_using_subcommand models" -s q -l quiet -d 'No progress bars or notes on stderr (errors are still printed)'
complete -c llmarch -n "__fish_llmarch_using_subcommand models" -l allow-unknown-keys -d 'Treat config keys llmarch does not know as warnings instead of errors'
complete -c llmarch -n "__fish_llmarch_using_subcommand models" -s h -l help -d 'Print help'
complete -c llmarch -n "__fish_llmarch_using_subcommand models" -s V -l version -d 'Print version'
complete -c llmarch -n "__fish_llmarch_using_subcommand completions" -s q -l quiet -d 'No progress bars or notes on stderr (errors are still printed)'
complete -c llmarch -n "__fish_llmarch_using_subcommand completions" -l allow-unknown-keys -d 'Treat config keys llmarch does not know as warnings instead of errors'
complete -c llmarch -n "__fish_llmarch_using_subcommand completions" -s h -l help -d 'Print help'
complete -c llmarch -n "__fish_llmarch_using_subcommand completions" -s V -l version -d 'Print version'
complete -c llmarch -n "__fish_llmarch_using_subcommand help; and not __fish_seen_subcommand_from inspect kv-budget models completions help" -f -a "inspect" -d 'Architecture of a model: per-layer table and parameter counts'
complete -c llmarch -n "__fish_llmarch_using_subcommand help; and not __fish_seen_subcommand_from inspect kv-budget models completions help" -f -a "kv-budget" -d 'KV-cache memory and attention budget, per model, context and layer'
complete -c llmarch -n "__fish_llmarch_using_subcommand help; and not __fish_seen_subcommand_from inspect kv-budget models completions help" -f -a "models" -d 'The built-in model aliases and supported families'
complete -c llmarch -n "__fish_llmarch_using_subcommand help; and not __fish_seen_subcommand_from inspect kv-budget models completions help" -f -a "completions" -d 'Shell completions (also committed under completions/)'
complete -c llmarch -n "__fish_llmarch_using_subcommand help; and not __fish_seen_subcommand_from inspect kv-budget models completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
