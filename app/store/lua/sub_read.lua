-- A subscription as GET shows it, in one snapshot.
--
-- Returns {'ok', {field, value, ...} of meta, {path, kinds, cursor, tail, ...}} | {'missing'}.
if redis.call('EXISTS', meta) == 0 then return {'missing'} end
return {'ok', redis.call('HGETALL', meta), links_reply()}
