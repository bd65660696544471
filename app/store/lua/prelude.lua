-- Shared by every script: loading prepends it (app/store/scripts.py), after the
-- TERMINAL set of statuses and before the lines that bind KEYS and ARGV to names.

-- Whether a generation with this status has its terminal event: nothing may follow it.
local function is_terminal(status)
  return TERMINAL[status] == true
end
